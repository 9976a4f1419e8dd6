"""Side-by-side benchmark of lan2gpu, ipyparallel, Dask distributed and raw pyzmq.

``python -m benchmarks.run`` (``--quick`` for the smoke version) prints one
markdown table per section; ``benchmarks/README.md`` says how to read them.

Layout::

    run.py        options, the order of the sections
    targets.py    what a run measured, and the data path's targets next to it
    sections.py   trivial call, array round trip, second run, unchanged kernel
    limits.py     what the machine can do at all: copy, hash, loopback TCP
    memory.py     peak resident memory, in fresh processes
    lan.py        an emulated 1 Gbit/s LAN: network namespaces, veth, tc tbf
    systems/      one module per system, each behind the same small interface
    procs.py      starting and stopping workers, reading /proc
    measure.py    timings, statistics, payloads
    report.py     markdown tables, machine information
    smoke.py      ``run_smoke(tmp_path)``: the reduced run the test suite calls
"""
