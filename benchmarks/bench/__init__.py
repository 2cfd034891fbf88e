"""The step benchmark's harness, one job a module; `benchmarks/step_bench.py` is its command line.

geometry   sizes, the random-weight model with LoRA, seeded pairs through the real image preprocessing
steps      each variant's inputs prepared before timing, the timed training step, forward-only loss values
flops      the FLOP formula behind MFU, and the device peak table
profiling  torch.profiler time charged to model parts and op kinds
env        device, library versions and commit, recorded with every result
report     the JSON report, the loss check across variants, speed-ups and the markdown tables
"""
