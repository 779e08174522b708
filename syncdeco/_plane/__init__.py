"""The sync plane: how syncdeco's sync points travel over torch.distributed.

One module a concern, each depending only on those listed before it:

* ``protocol``: the decisions, as pure functions over frames (no I/O);
* ``transport``: how frames and verdicts move over a c10d store;
* ``wire``: results on the wire (pickle, and tensors by broadcast);
* ``watch``: the thread that reports a sync point that waits too long;
* ``stacks``, ``share``, ``shm``, ``pernode``: where a missing rank is
  stuck, and results handed on once per node (through files in
  ``/dev/shm``, or the store where those do not fit);
* ``exits``: what a rank's exit says, and where it is written;
* ``tier``: a store per node, and the node frames rank 0 reads;
* ``exchange``: one rank's side of every sync point, given its store,
  rank, world size and place as values (so ranks can be simulated);
* ``deathwatch``: the processes of a host's other ranks, through the kernel;
* ``group``: the process group's lifecycle and the exit notice;
* ``backend``: ``TorchBackend``, the face the rest of syncdeco uses.
"""
