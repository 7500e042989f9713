"""Simulated scale: K workers of the real PALSGD core in one process, wall time modeled from measured costs.

* :mod:`.run`: one simulated run (DDP, Local SGD, DiLoCo or PALSGD) on a tiny GPT-Neo and the offline
  Shakespeare corpus; every worker is a thread, collectives meet at a thread barrier
  (``tests/helpers/threads.py``). Same global batch, data order, model init and LR schedule for every K.
* :mod:`.wall_time`: the *modeled* wall time of a run: measured per-step compute of one worker's
  micro-batch plus communication charged per collective as bytes / bandwidth + latency.
* :mod:`.sweep`: the command line: grids of runs -> JSON lines, markdown tables and a plot.

Quality is real (the global model's eval loss); times are modeled, never measured on a network.
"""
