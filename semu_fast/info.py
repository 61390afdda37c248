"""`python -m semu_fast.info`: which backend serves each op here, and why the others do not."""
from ._backends import describe

if __name__ == "__main__":
    print(describe())
