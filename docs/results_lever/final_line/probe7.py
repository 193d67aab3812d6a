"""old repeat yardstick (whole-batch median) vs the new (median over the kept images), same session, same seeds, one process"""
import sys, torch
sys.path.insert(0, "/work/main/benchmarks")
import final_draw
import apa.session.final as fin
torch.set_num_threads(1)
new = fin.repeats
def old(x, share=fin.REPEAT_SHARE, seen=None, within=None):
    n = x.shape[0]
    if n < 2:
        return torch.zeros(n, dtype=torch.bool)
    flat = x.reshape(n, -1).double().cpu()
    d = torch.cdist(flat, flat); d.fill_diagonal_(float("inf"))
    threshold = share * float(d.min(dim=1).values.median())
    near = fin.seen_distance(flat, seen) <= within if within is not None else torch.zeros(n, dtype=torch.bool)
    d[:, near] = float("inf")
    return ~fin.kept_greedily(d, threshold) | near
ref = torch.load(sys.argv[1])
V = "set:session.mild_final=true;session.final_repeats=16;session.final_unseen=0.05"
print("| session | yardstick | liked (oracle) | distinct of 256 | yield | yield (judge) | liked (judge) | rarest liked class (judge) | – | final-batch call rows |\n|" + "---|" * 10, flush=True)
for src in sys.argv[2:]:
    for name, f in (("whole batch", old), ("kept images", new)):
        fin.repeats = f
        import io, contextlib
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            final_draw.print_session(src, [V], ref)
        print(buf.getvalue().replace(V, name), end="", flush=True)
