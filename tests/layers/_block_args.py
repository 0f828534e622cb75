"""Constructor arguments that fit each registered block to 8 channels and tiny maps (the defaults need wide ones),
shared by the registry-driven tests: a block that needs none is absent."""

SMALL = {
    'axial': dict(num_heads=2),
    'bat': dict(block_size=3),  # 5×7 maps: bands of 2 rows and 3 columns, the last ones partly padding
    'lambda': dict(r=3),  # a scope smaller than the 5×7 map
    'ela': dict(norm_groups=4),
    'ema': dict(num_bases=4),
    'external': dict(num_slots=4),
    'halo': dict(num_heads=2, block_size=4, halo_size=1),
    'ham': dict(rank=4),
    'issa': dict(down_factor=(2, 4)),
    'mixer': dict(num_heads=2),
    'na': dict(num_heads=2),
    'psa': dict(groups=(1, 1, 2, 2)),
    'repmlp': dict(feat_size=(5, 7), partition_size=(3, 4), conv_kernels=(1, 3)),  # a 2×2 grid, padded
    'sasa': dict(num_heads=2, kernel_size=3),
    'sge': dict(groups=4),
    'shift': dict(shift_div=1 / 8),
    'sk': dict(groups=2, min_rd_channels=4),
    'window': dict(num_heads=2, window_size=3, shift_size=1),  # 5×7 maps: shifted, padded windows
    'window_v2': dict(num_heads=2, window_size=3, shift_size=1),
}
