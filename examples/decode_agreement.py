"""Do `generate` and `generate(static=True)` compute the same function? Rounding near a tie, or a real difference.

    python examples/decode_agreement.py --dtype bfloat16 --ref float32      # elleci-v1, random weights (~9 GB)
    python examples/decode_agreement.py --dtype float64 --layers 4          # v1 width, 4 layers, in float64
    python examples/decode_agreement.py --preset tiny --dtype bfloat16 --ref float64   # seconds

Teacher-forced, so every path sees the same tokens: the greedy continuation of the dynamic decoder is fixed
first, then for each new position the logits of
    dyn     the dynamic-cache decoder (`generate`'s step: `hidden_states` with an InferenceCache),
    static  the static decoder (`StaticDecoder.step`) with `--slots` cache columns (several sizes),
    full    one full forward over the whole sequence,
are compared with each other and with the same model run in `--ref` precision (a full forward on a copy of
the weights in that dtype: the "exact" function up to its own rounding). Printed per position: the largest
|Δ logit| between paths and to the reference, the reference's top-2 margin, whether the argmaxes differ,
and how many of the BitLinear 8-bit activation codes q = round(x·127/max|x|) of the new token differ
between dyn and static (a flip moves a FFN input by one quantisation step: a discontinuity that turns
last-bit differences into visible ones).
"""
from __future__ import annotations

import argparse

import torch

from elleci.model import ElleciConfig, ElleciLM
from elleci.model import layers as layers_mod
from elleci.model.decode import StaticDecoder


class _QRecorder:
    """Records the 8-bit codes of every BitLinear activation quantisation while active."""

    def __init__(self):
        self.codes, self.active = [], False
        self._real = layers_mod.quantize_activations

    def __enter__(self):
        def rec(x, eps=1e-5):
            q, s = self._real(x, eps)
            if self.active:
                self.codes.append(q[..., -1:, :].detach().clone() if q.dim() == 3 else q.detach().clone())
            return q, s
        layers_mod.quantize_activations = rec
        return self

    def __exit__(self, *exc):
        layers_mod.quantize_activations = self._real


@torch.no_grad()
def dynamic_logits(model, ids, P, rec):
    cache = model.new_cache(1)
    model.hidden_states(ids[:, :P], cache=cache)
    out, codes = [], []
    for t in range(P, ids.shape[1]):
        rec.codes, rec.active = [], True
        h = model.hidden_states(ids[:, t:t + 1], cache=cache)
        rec.active = False
        out.append(model.lm_head(h[:, -1]).float()[0])
        codes.append(rec.codes)
    return torch.stack(out), codes


@torch.no_grad()
def static_logits(model, ids, P, slots, rec):
    dec = StaticDecoder(model, max_len=slots, cuda_graph=False)
    dec.prefill(ids[:, :P], torch.ones(1, P, dtype=torch.bool))
    out, codes = [], []
    for t in range(P, ids.shape[1]):
        rec.codes, rec.active = [], True
        out.append(dec.step(ids[:, t]).clone()[0])
        rec.active = False
        codes.append(rec.codes)
    return torch.stack(out), codes


def _flips(a, b) -> int:
    return sum(int((x.flatten() != y.flatten()).sum()) for x, y in zip(a, b))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="elleci-v1")
    ap.add_argument("--layers", type=int, default=None, help="override n_layers (float64 at v1 width)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ref", default=None, help="reference precision (a full forward), e.g. float32 / float64")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=12)
    ap.add_argument("--slots", type=int, nargs="+", default=[40, 64])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    over = {} if args.layers is None else {"n_layers": args.layers}
    config = ElleciConfig.from_name(args.preset, **over)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    model = ElleciLM(config, dtype=dtype).eval()
    prompt = torch.randint(5, config.vocab_size - 100, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    P = args.prompt
    with torch.no_grad():
        ids = model.generate(prompt, args.new, temperature=0.0)                     # dyn's greedy tokens
        full = model(ids)[0, P - 1:-1].float()
    with _QRecorder() as rec:
        dyn, dyn_q = dynamic_logits(model, ids, P, rec)
        stat = {s: static_logits(model, ids, P, s, rec) for s in args.slots if s >= ids.shape[1]}
    ref = None
    if args.ref:                   # the same weights, upcast exactly, run in the reference precision
        with torch.no_grad():
            ref = model.to(getattr(torch, args.ref))(ids)[0, P - 1:-1].float()
    # dyn[t] predicts token P+t+1 from ids[:P+t+1]; full/ref[t+1] are the same position. Position 0 of
    # full/ref is the prompt's last token, which dyn does not produce (its prefill): shift by one.
    full, ref = full[1:], (ref[1:] if ref is not None else None)
    n = dyn.shape[0] - 1
    dyn = dyn[:n]
    print(f"preset {args.preset} layers {config.n_layers} dtype {args.dtype} ref {args.ref} prompt {P} new {args.new}")
    head = "| pos | max|dyn-full| | " + " | ".join(f"max|dyn-static{s}| | q flips dyn/static{s}" for s in stat)
    head += " | max|dyn-ref| | max|full-ref| | ref top-2 margin | argmax dyn/full/static/ref |" if ref is not None else " |"
    print(head)
    rows = []
    for t in range(n):
        row = {"pos": t + 1, "dyn_full": float((dyn[t] - full[t]).abs().max())}
        for s, (lg, q) in stat.items():
            row[f"dyn_static{s}"], row[f"flips{s}"] = float((dyn[t] - lg[t]).abs().max()), _flips(dyn_q[t], q[t])
        if ref is not None:
            top = ref[t].topk(2).values
            row.update(dyn_ref=float((dyn[t] - ref[t]).abs().max()), full_ref=float((full[t] - ref[t]).abs().max()),
                       margin=float(top[0] - top[1]),
                       argmax=[int(dyn[t].argmax()), int(full[t].argmax())]
                       + [int(lg[t].argmax()) for lg, _ in stat.values()] + [int(ref[t].argmax())])
        rows.append(row)
        cells = [f"{v:.3g}" if isinstance(v, float) else
                 ("same" if len(set(v)) == 1 else "/".join(map(str, v))) if isinstance(v, list) else str(v)
                 for v in row.values()]
        print("| " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    main()
