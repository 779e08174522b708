"""torchrun, as its console script runs it (``torch.distributed.run:main``).

For tests that fork torchrun's agent from the zygote (``tests/zygote.py``),
which has torch imported already: the agent is torchrun's own code, and the
ranks it starts are fresh interpreters, as under the ``torchrun`` command.
"""

from torch.distributed.run import main

if __name__ == "__main__":
    main()
