"""The merge methods, one module each: a pure function of tensors and the spec that registers it.

Each module holds one method's maths and its :class:`~lightning_mergeguard.merging.spec.MethodSpec` (listed in
:mod:`~lightning_mergeguard.merging.registry`); :mod:`.generalized` (task arithmetic with sparsification and sign
consensus), :mod:`.sparsify` and :mod:`.consensus` are the pieces several methods share.
"""
