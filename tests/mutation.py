"""
Mutating valid wire payloads for property tests: whatever is flipped, cut
or inserted, a decoder must decode or refuse, never crash.
"""

from hypothesis import strategies as st


def mutated(data, raw):
    """C{raw} with one to five bytes flipped, tails cut or bytes inserted, as drawn from C{data}."""
    raw = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 5))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        position = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[position] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[position:]
        else:
            raw[position:position] = data.draw(st.binary(min_size=1, max_size=8))
    return bytes(raw)
