"""The BEVNeXt networks, as plain PyTorch modules with the reference's state-dict names.

Build the whole detector from a model config with :func:`bevnext.models.detector.build_model`; the parts live in
one module each:

* ``backbone`` (ResNet image backbone), ``image_neck`` (single-level FPN);
* ``depth_net``, ``crf`` and ``view_transform`` (camera features -> depth -> BEV, lift-splat);
* ``bev_encoder`` (BEV ResNet, FPN-LSS neck) and ``res2fusion`` (stage-2 temporal BEV backbone);
* ``refinement`` (perspective refinement of the BEV by deformable attention into the cameras);
* ``heads``, ``targets``, ``losses`` and ``decode`` (CenterPoint heads, their training targets and losses, boxes);
* ``blocks`` (layers shared by several of the above), ``detector`` (the composed ``BEVNeXt``).

A reference checkpoint loads into the built model without a key map.
"""
