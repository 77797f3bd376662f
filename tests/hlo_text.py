"""Reading XLA's compiled HLO text in tests that check what the compiler made of our code."""

import re


def computations(hlo: str) -> dict[str, list[str]]:
    """Each computation of a compiled module (``jit(...).lower(...).compile().as_text()``):
    its name -> its instruction lines."""
    comps, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if head:
            name = head.group(1)
            comps[name] = []
        elif name is not None and line.strip() != "}":
            comps[name].append(line)
    return comps
