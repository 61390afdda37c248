"""`python -m semu_fast.info` (also `semu-fast info`): which backend serves each op here, and why the others do
not."""
from .ops import describe

if __name__ == "__main__":
    print(describe())
