"""The sync plane: how syncdeco's sync points travel over torch.distributed.

A sans-IO core decides; a thin driver does the I/O (h11 is the model).
One module a concern, each importing only those listed before it (checked
by ``tests/test_imports.py``):

* ``frames``: frames, node frames and verdicts as named values, and their
  one codec;
* ``deadline``: how long a sync point waits (a ``Deadline`` value, with the
  grace per tier);
* ``protocol``: the rules, as pure functions over those values (the route
  a rank takes, the verdict, the withdrawal, who waits for a rank);
* ``transport``: how frames and verdicts move over a c10d store, and the
  one store wait (``wait_on``);
* ``share``, ``shm``, ``wire``: results on the wire (pickle, and tensors by
  broadcast, or through files in ``/dev/shm``);
* ``pernode``: results handed on once per node;
* ``watch``: the thread that reports a sync point that waits too long (and
  makes a waiting node's looks at the job's store);
* ``exits``: what a rank's exit says, and where it is written;
* ``keepalive``, ``lease``, ``stacks``: lost hosts, node leases, and where
  a missing rank is stuck;
* ``tier``: a store per node, and this rank's part in it;
* ``relay``: what a waiting node does on the job's store (its main's
  relay key, the looks for rank 0's verdict);
* ``exchange``: one rank's side of every sync point, driving the core,
  given its store, rank, world size and place as values (so ranks can be
  simulated);
* ``deathwatch``, ``pulse``, ``nodewatch``: the processes of a host's other
  ranks, and the node leases;
* ``failfast``: ending this rank when a peer is lost outside a sync point;
* ``session``: one process group's exchange and the threads that serve it
  (started and stopped explicitly), the ranks they see end, the exit notice;
* ``group``: which session a sync point uses, the group's lifecycle, the
  exit notice at interpreter exit;
* ``backend``: ``TorchBackend``, the face the rest of syncdeco uses.
"""
