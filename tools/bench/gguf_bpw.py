# Bits per weight of a GGUF's decoder-block linear layers (attn_q/k/v/output, ffn_gate/up/down).
import sys, gguf, re
r = gguf.GGUFReader(sys.argv[1])
bits = n = 0
types = {}
for t in r.tensors:
    if re.match(r'blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$', t.name):
        ne = int(t.n_elements); bits += int(t.n_bytes) * 8; n += ne
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + ne
print(f"{bits / n:.3f}", {k: f"{v / n:.0%}" for k, v in types.items()})
