"""Import-only stand-in for torchaudio, installed by llamafactory-macdrop's CPU set-up.

Why: LLaMA-Factory 0.9.5 imports torchaudio at module level (llamafactory/data/mm_plugin.py) but
uses it only to read audio inputs. On CPU-only torch 2.13.0 no PyPI torchaudio imports (the PyPI
wheels are built for other torch releases and link CUDA libraries), so text-only training could
not even start. This stand-in lets ``import torchaudio`` succeed; touching anything in it raises
an ImportError that says what to install instead. scripts/setup.sh installs it only when a real
torchaudio does not import, and never over a working one.
"""

__version__ = "0.0.0+placeholder"
__placeholder__ = True


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError(
        f"torchaudio.{name} is unavailable: this environment has llamafactory-macdrop's torchaudio "
        "placeholder (CPU torch without a matching torchaudio). Audio datasets need a torch and "
        "torchaudio pair of the same release: pip uninstall macdrop-torchaudio-placeholder && "
        "pip install torch==X torchaudio==X"
    )
