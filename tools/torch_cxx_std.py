"""Print the C++ standard flag value (e.g. ``c++20``) that the installed torch
builds its extensions with, so other native builds (mmcv) can match it."""
import re

import torch.utils.cpp_extension as cpp_extension

with open(cpp_extension.__file__) as f:
    source = f.read()
found = re.findall(r"std=(c\+\+\d\d)", source)
# torch < 2.1 had no explicit flag in cpp_extension and used C++17 headers.
print(max(found, key=lambda s: int(s[3:])) if found else "c++17")
