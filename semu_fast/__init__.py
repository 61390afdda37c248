"""semu_fast: SEMU machine unlearning (SVD of forget-set gradients, train a tiny k x k core per layer), fast.

    import semu_fast as sf
    sm = sf.prepare(model, forget_loader, config=sf.SEMUConfig(gamma=0.95))
    print(sm.report)
"""
from . import ops
from .config import SEMUConfig
from .model import BaseMismatchError, SEMUModel, load_adapters, save_adapters
from .ops import backends, calibrate
from .pipeline import prepare
from .presets import preset
from .report import LayerReport, SEMUReport
from .training import unlearn

__version__ = "0.1.0"
__all__ = ["SEMUConfig", "SEMUModel", "SEMUReport", "LayerReport", "backends", "calibrate", "ops", "prepare",
           "preset", "unlearn", "save_adapters", "load_adapters", "BaseMismatchError"]
