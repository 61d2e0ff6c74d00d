"""heapq's functions as compiled code reaches them fastest.

Compiled code reads an imported name (``from heapq import heappush``) from the module's dict at
every call, about 100 instructions; a Final is a C static. The per-request code pushes and pops
a heap several times a request (deadlines, member loads, timers).
"""

from __future__ import annotations

import heapq
from typing import Final

heapify: Final = heapq.heapify
heappop: Final = heapq.heappop
heappush: Final = heapq.heappush
heapreplace: Final = heapq.heapreplace
