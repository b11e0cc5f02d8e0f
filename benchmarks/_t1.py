import time, torch
t=time.perf_counter()
from common import *
from mcl_runtime import Engine, SamplingParams
from mcl_runtime.demo import demo_adapter_dirs, demo_model_dir
print("import", time.perf_counter()-t); t=time.perf_counter()
e = Engine(model=demo_model_dir()/"base", adapters=demo_adapter_dirs(), device="cpu")
print("engine", time.perf_counter()-t)
for r in range(3):
    wl = make_workload(64, (128,512), (64,64), list(AGENTS), seed=r)
    res = run_workload(e, wl)
    print(res.summary())
