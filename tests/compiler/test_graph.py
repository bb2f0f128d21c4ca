"""OperatorGraph: golden operator tables of the tiny UNets, and the analysis leaves the graph untouched."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import make_tiny_sd_unet, make_tiny_unet2d

from ldpruner.compiler.graph import Action, build_operator_graph
from ldpruner.compiler.tracer import trace_unet

# Golden tables, checked by hand once: e.g. down_blocks.0.resnets.0 = norm1 64 + conv1 9,248 + time_emb_proj
# 4,128 + norm2 64 + conv2 9,248 = 22,752 params, and 2 x 32*32*9*256 + 128*32 = 4,722,688 MACs; the shortcut
# resnet down_blocks.1.resnets.0 drops 65,984 - 2,112 (its kept 1x1 conv_shortcut) = 63,872; a sublayer
# operator takes its own pre-norm with it (attn1 4,128 + norm1 64 = 4,192); self-attention at 16x16 with 4 heads
# of 8: projections 4 x 256*32*32 + scores and mixing 4*256*256*(8+8) = 5,242,880 MACs.
SD_BLOCK = """\
operator                      kind         action         in        out        params        MACs
down_blocks.0.resnets.0       resnet       identity       32x16x16  32x16x16   22,752   4,722,688
down_blocks.0.attentions.0    transformer  identity       32x16x16  32x16x16   23,200  10,856,448
down_blocks.0.downsamplers.0  downsample   not-removable  32x16x16  32x8x8          0           0
down_blocks.1.resnets.0       resnet       shortcut       32x8x8    64x8x8     63,872   3,547,136
mid_block.resnets.0           resnet       identity       64x8x8    64x8x8     82,368   4,726,784
mid_block.attentions.0        transformer  identity       64x8x8    64x8x8     87,360   6,713,344
mid_block.resnets.1           resnet       identity       64x8x8    64x8x8     82,368   4,726,784
up_blocks.0.resnets.0         resnet       shortcut       128x8x8   64x8x8    119,360   7,086,080
up_blocks.0.resnets.1         resnet       shortcut       96x8x8    64x8x8    100,864   5,906,432
up_blocks.0.upsamplers.0      upsample     not-removable  64x8x8    64x16x16        0           0
up_blocks.1.resnets.0         resnet       shortcut       96x16x16  32x16x16   41,312   9,441,280
up_blocks.1.attentions.0      transformer  identity       32x16x16  32x16x16   23,200  10,856,448
up_blocks.1.resnets.1         resnet       shortcut       64x16x16  32x16x16   32,032   7,081,984
up_blocks.1.attentions.1      transformer  identity       32x16x16  32x16x16   23,200  10,856,448
14 operators, 12 removable; UNet params 792,964, MACs/sample 99,518,464
"""

SD_SUBLAYER = """\
operator                                               kind             action         in        out        params       MACs
down_blocks.0.resnets.0                                resnet           identity       32x16x16  32x16x16   22,752  4,722,688
down_blocks.0.attentions.0.transformer_blocks.0.attn1  self-attention   identity       256x32    256x32      4,192  5,242,880
down_blocks.0.attentions.0.transformer_blocks.0.attn2  cross-attention  identity       256x32    256x32      4,192  1,943,552
down_blocks.0.attentions.0.transformer_blocks.0.ff     feed-forward     identity       256x32    256x32     12,640  3,145,728
down_blocks.0.downsamplers.0                           downsample       not-removable  32x16x16  32x8x8          0          0
down_blocks.1.resnets.0                                resnet           shortcut       32x8x8    64x8x8     63,872  3,547,136
mid_block.resnets.0                                    resnet           identity       64x8x8    64x8x8     82,368  4,726,784
mid_block.attentions.0.transformer_blocks.0.attn1      self-attention   identity       64x64     64x64      16,576  1,572,864
mid_block.attentions.0.transformer_blocks.0.attn2      cross-attention  identity       64x64     64x64      12,480  1,470,464
mid_block.attentions.0.transformer_blocks.0.ff         feed-forward     identity       64x64     64x64      49,856  3,145,728
mid_block.resnets.1                                    resnet           identity       64x8x8    64x8x8     82,368  4,726,784
up_blocks.0.resnets.0                                  resnet           shortcut       128x8x8   64x8x8    119,360  7,086,080
up_blocks.0.resnets.1                                  resnet           shortcut       96x8x8    64x8x8    100,864  5,906,432
up_blocks.0.upsamplers.0                               upsample         not-removable  64x8x8    64x16x16        0          0
up_blocks.1.resnets.0                                  resnet           shortcut       96x16x16  32x16x16   41,312  9,441,280
up_blocks.1.attentions.0.transformer_blocks.0.attn1    self-attention   identity       256x32    256x32      4,192  5,242,880
up_blocks.1.attentions.0.transformer_blocks.0.attn2    cross-attention  identity       256x32    256x32      4,192  1,943,552
up_blocks.1.attentions.0.transformer_blocks.0.ff       feed-forward     identity       256x32    256x32     12,640  3,145,728
up_blocks.1.resnets.1                                  resnet           shortcut       64x16x16  32x16x16   32,032  7,081,984
up_blocks.1.attentions.1.transformer_blocks.0.attn1    self-attention   identity       256x32    256x32      4,192  5,242,880
up_blocks.1.attentions.1.transformer_blocks.0.attn2    cross-attention  identity       256x32    256x32      4,192  1,943,552
up_blocks.1.attentions.1.transformer_blocks.0.ff       feed-forward     identity       256x32    256x32     12,640  3,145,728
22 operators, 20 removable; UNet params 792,964, MACs/sample 99,518,464
"""

UNET2D_BLOCK = """\
operator                      kind        action         in        out        params       MACs
down_blocks.0.resnets.0       resnet      identity       32x16x16  32x16x16   22,752  4,722,688
down_blocks.0.downsamplers.0  downsample  not-removable  32x16x16  32x8x8          0          0
down_blocks.1.resnets.0       resnet      shortcut       32x8x8    64x8x8     63,872  3,547,136
down_blocks.1.attentions.0    attention   identity       64x8x8    64x8x8     16,768  1,572,864
mid_block.resnets.0           resnet      identity       64x8x8    64x8x8     82,368  4,726,784
mid_block.attentions.0        attention   identity       64x8x8    64x8x8     16,768  1,572,864
mid_block.resnets.1           resnet      identity       64x8x8    64x8x8     82,368  4,726,784
up_blocks.0.resnets.0         resnet      shortcut       128x8x8   64x8x8    119,360  7,086,080
up_blocks.0.attentions.0      attention   identity       64x8x8    64x8x8     16,768  1,572,864
up_blocks.0.resnets.1         resnet      shortcut       96x8x8    64x8x8    100,864  5,906,432
up_blocks.0.attentions.1      attention   identity       64x8x8    64x8x8     16,768  1,572,864
up_blocks.0.upsamplers.0      upsample    not-removable  64x8x8    64x16x16        0          0
up_blocks.1.resnets.0         resnet      shortcut       96x16x16  32x16x16   41,312  9,441,280
up_blocks.1.resnets.1         resnet      shortcut       64x16x16  32x16x16   32,032  7,081,984
14 operators, 12 removable; UNet params 702,499, MACs/sample 66,379,776
"""


@functools.cache
def operator_graph(make, granularity):
    return build_operator_graph(trace_unet(make(), granularity=granularity))


@pytest.mark.parametrize(
    ("make", "granularity", "expected"),
    [
        (make_tiny_sd_unet, "block", SD_BLOCK),
        (make_tiny_sd_unet, "sublayer", SD_SUBLAYER),
        (make_tiny_unet2d, "block", UNET2D_BLOCK),
    ],
    ids=["sd-block", "sd-sublayer", "unet2d-block"],
)
def test_operator_table_is_golden(make, granularity, expected):
    assert operator_graph(make, granularity).table() == expected.rstrip("\n")


def test_building_the_operator_graph_leaves_the_graph_unchanged():
    traced = operator_graph(make_tiny_sd_unet, "sublayer").traced
    code = traced.gm.code
    state = {k: v.clone() for k, v in traced.gm.state_dict().items()}
    og = build_operator_graph(traced)
    assert traced.gm.code == code
    after = traced.gm.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert og.output_shape == (2, 4, 16, 16)


def test_branch_operators_name_their_residual_add_and_blocks_their_tuple_output():
    block = operator_graph(make_tiny_sd_unet, "block")
    transformer = block["down_blocks.0.attentions.0"]
    assert transformer.join is None and transformer.output != transformer.node  # returns a tuple: getitem[0]
    sub = operator_graph(make_tiny_sd_unet, "sublayer")
    ff = sub["mid_block.attentions.0.transformer_blocks.0.ff"]
    assert ff.action is Action.IDENTITY and ff.join is not None
    # the residual add feeds the rest of the transformer
    assert sub.structure.edges[ff.name, "mid_block.attentions.0.proj_out"]["kind"] == "residual"
    # a down-level output reaches its up-level resnet through a skip concatenation
    assert block.skip_edges() == [
        ("conv_in", "up_blocks.1.resnets.1"),
        ("down_blocks.0.attentions.0", "up_blocks.1.resnets.0"),
        ("down_blocks.0.downsamplers.0", "up_blocks.0.resnets.1"),
        ("down_blocks.1.resnets.0", "up_blocks.0.resnets.0"),
    ]
