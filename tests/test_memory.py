import torch

from attnlab.memory import peak_bytes


def test_peak_counts_new_tensors_not_the_weights_an_op_reads():
    lin = torch.nn.Linear(1024, 1024)
    x = torch.randn(2, 1024)
    with torch.no_grad():
        peak = peak_bytes(lambda: lin(x))
    assert peak == 2 * 1024 * 4, peak          # the output only, not the 4 MiB weight (or its transpose view)


def test_peak_sees_what_is_alive_at_once():
    def f():
        a = torch.ones(1000)          # 4000 bytes
        b = torch.ones(2000)          # 8000 bytes, both alive
        del a
        c = torch.ones(500)           # 2000 bytes, after a is freed
        return b, c
    assert peak_bytes(f) == 12000
    assert peak_bytes(lambda: torch.ones(10).add_(1).view(2, 5)) == 40   # in-place and views add nothing
