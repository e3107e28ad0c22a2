"""Suite-wide settings.

Every model in the tests is tiny; on a 2-core machine torch's intra-op threads cost more than they give
(a tiny Linear ran ~20x slower with 2 threads than with 1 under load), so the suite runs on one thread.
"""

import torch

torch.set_num_threads(1)
