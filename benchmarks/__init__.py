"""
Benchmark tools for mailgw: a load generator, a counting sink, a reference
server and a driver that runs the scenarios. See benchmarks/README.md.
"""
