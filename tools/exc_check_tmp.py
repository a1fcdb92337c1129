import sys, torch
from hybrid.ops import cuda_backend as cb
from hybrid.ops import cuda_streamk as sk
assert cb.available(), cb.load_error()
x = torch.randn(4, 128, device="cuda", dtype=torch.bfloat16)
w = torch.randn(100, 128, device="cuda", dtype=torch.bfloat16)
which = sys.argv[1]
try:
    if which == "skinny":
        torch.ops.hybrid.skinny_gemm(x, w)
    else:
        torch.ops.hybrid.skinny_gemm_streamk(x, w, None, False, sk.counters(x.device), 0, False)
    print(which, "did not raise")
except RuntimeError as e:
    print(which, "raised:", str(e).splitlines()[0][:120])
