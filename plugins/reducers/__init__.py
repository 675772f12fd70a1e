"""First-party compute reducers, registered through the `dyncompute.plugins` entry points.

- `token_merging`: ToMe / ToMe for SD, merge -> op -> unmerge around attention (and the MLP);
- `fora`, `taylorseer` (`feature_cache`): reuse or forecast every block's attention and MLP outputs;
- `teacache`: skip the whole backbone while the rescaled change of block 0's modulated input is small.

`layout` carries stored per-token tensors across steps whose tokens differ (DC-DiT).
"""
