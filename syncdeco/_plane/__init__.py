"""The sync plane: how syncdeco's sync points travel over torch.distributed.

One module a concern, each importing only those listed before it (checked
by ``tests/test_imports.py``; ``exits``, ``tier`` and ``watch`` still name
``Exchange`` for type checking only, a circle being removed):

* ``protocol``: the decisions, as pure functions over frames (no I/O);
* ``transport``: how frames and verdicts move over a c10d store;
* ``wire``: results on the wire (pickle, and tensors by broadcast);
* ``keepalive``: connections to the job's store that notice its host's loss;
* ``stacks``, ``share``, ``shm``, ``pernode``: where a missing rank is
  stuck, and results handed on once per node (through files in
  ``/dev/shm``, or the store where those do not fit);
* ``exits``: what a rank's exit says, and where it is written;
* ``tier``: a store per node, and the node frames rank 0 reads;
* ``watch``: the thread that reports a sync point that waits too long;
* ``exchange``: one rank's side of every sync point, given its store,
  rank, world size and place as values (so ranks can be simulated);
* ``deathwatch``: the processes of a host's other ranks, through the kernel;
* ``lease``, ``pulse``, ``nodewatch``: each node's lease on the job's
  store, renewed by its pulse process, and the watch of the other nodes';
* ``session``: one process group's exchange and the threads that serve it
  (started and stopped explicitly), the ranks they see end, the exit notice;
* ``group``: which session a sync point uses, the group's lifecycle, the
  exit notice at interpreter exit;
* ``backend``: ``TorchBackend``, the face the rest of syncdeco uses.
"""
