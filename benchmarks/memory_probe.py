"""Peak memory of one FiPS compression of SmolLM2-135M at 20%, and in which phase it happens.

    python benchmarks/memory_probe.py [STEPS]      # tuning steps per group (default 2: the peak
                                                    # hardly depends on them; 200 is the recipe's)

Samples the process RSS every 50 ms and prints it after loading, after the calibration
capture, before saving and at the end, with the peak and the phase it was reached in.
"""
import resource
import sys
import tempfile
import threading
import time

import psutil

import layershare

proc = psutil.Process()
peak = [0, ""]
phase = ["load"]
def sample():
    while True:
        r = proc.memory_info().rss / 2**20
        if r > peak[0]:
            peak[0], peak[1] = r, phase[0]
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
m, t = layershare.load_model("smollm2-135m")
print("after load", proc.memory_info().rss / 2**20, "peak", peak, flush=True)
phase[0] = "compress"


class Phases(layershare.Callback):
    """Names the phase the RSS sampler attributes its peak to (no monkeypatching)."""

    def on_stage_start(self, stage, method, plan):
        phase[0] = "capture"

    def on_group_start(self, stage, group, blocks):
        if group == 0:
            print("after capture", proc.memory_info().rss / 2**20, "peak", peak, flush=True)
        phase[0] = f"group {group}"

    def on_stage_end(self, stage, report):
        phase[0] = "save"
        print("before save", proc.memory_info().rss / 2**20, "peak", peak, flush=True)


steps = int(sys.argv[1]) if len(sys.argv) > 1 else 2
with tempfile.TemporaryDirectory() as d:
    res = layershare.compress(m, layershare.FiPSConfig(ratio=0.2, steps=steps), data="austen:sensesensibility",
                              tokenizer=t, output_dir=d + "/c", callbacks=[Phases()])
    print("after compress", proc.memory_info().rss / 2**20, "peak", peak, "maxrss",
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, flush=True)
