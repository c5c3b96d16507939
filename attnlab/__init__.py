"""attnlab: attach small trainable attention modules to a frozen pretrained causal LM, train only
them, and measure them honestly against standard baselines.

    import attnlab
    bb = attnlab.load_backbone("smollm2-135m")          # frozen, eval mode
    lora = attnlab.attach(bb.model, "lora", r=8)        # in place; lora.detach() restores the base
    lora.save_pretrained("out/lora")
    attnlab.load_plugin(bb.model, "out/lora")           # refuses a different base
"""

__version__ = "0.1.0"

import os  # noqa: E402

# torch.profiler (attnlab profile) would print a line at every start/stop; read when torch loads
os.environ.setdefault("KINETO_LOG_LEVEL", "99")

from .backbone import Backbone, load_backbone  # noqa: E402
from .modules import (METHODS, PluginSet, attach, attached, disabled, load_plugin, patch,  # noqa: E402
                      register_method, unpatch)

__all__ = ["Backbone", "load_backbone", "attach", "load_plugin", "patch", "unpatch", "PluginSet", "METHODS",
           "register_method", "attached", "disabled", "__version__"]
