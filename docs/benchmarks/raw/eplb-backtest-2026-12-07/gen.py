"""A recorded-like trace for `moectl backtest`: per layer, each expert's log-popularity takes
a Gaussian random-walk step of sd 0.15 per window (no mean reversion, unlike eplb::synth), and a
window's counts are Poisson-like around 50,000 token-expert assignments per layer.

    python3 gen.py SEED > rwSEED.json      # [W][L][E]: 40 windows, 8 layers, 16 experts
    python3 gen.py SEED SD EXPERTS > t.json  # another step sd and expert count (same draws
                                             # as above for 0.15 and 16)
"""
import json
import math
import random
import sys

seed = int(sys.argv[1])
sd = float(sys.argv[2]) if len(sys.argv) > 2 else 0.15
experts = int(sys.argv[3]) if len(sys.argv) > 3 else 16
random.seed(seed)
layers, windows = 8, 40
logp = [[random.gauss(0, 1) for _ in range(experts)] for _ in range(layers)]
trace = []
for _ in range(windows):
    window = []
    for layer in range(layers):
        z = sum(math.exp(x) for x in logp[layer])
        means = [50000 * math.exp(x) / z for x in logp[layer]]
        window.append([max(0, round(m + random.gauss(0, 1) * math.sqrt(m))) for m in means])
        logp[layer] = [x + random.gauss(0, sd) for x in logp[layer]]
    trace.append(window)
json.dump(trace, sys.stdout)
