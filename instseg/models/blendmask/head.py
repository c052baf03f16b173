"""BlendMask's detector head: FCOS plus the top layer, which predicts each location's attentions.

Reference: AdelaiDet adet/modeling/blendmask/blendmask.py (``top_layer``: a 3x3 conv on FCOS's box
tower with K * M * M outputs, normal(0.01) init) and adet/modeling/fcos/fcos_outputs.py (FCOS's
assignment, losses and inference with THRESH_WITH_CTR). Like mmdet's CondInstBboxHead it keeps the
positive locations of the last loss call for the mask head (``get_positive_infos``).
"""
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmdet.models.dense_heads import FCOSHead
from mmdet.models.utils import filter_scores_and_topk, select_single_mlvl
from mmengine.structures import InstanceData
from torch import Tensor

from instseg.registry import MODELS

INF = 1e8


@MODELS.register_module()
class BlendMaskBboxHead(FCOSHead):
    """FCOSHead with the top layer. Args (besides FCOSHead's):
        num_bases: K, the basis module's number of bases.
        attention_size: M, each attention map's side.
        use_scale: FCOS's learnable per-level scale on the box distances (AdelaiDet's
            Base-BlendMask.yaml: FCOS.USE_SCALE False).
    """

    def __init__(self, *args, num_bases: int = 4, attention_size: int = 14, use_scale: bool = True,
                 **kwargs) -> None:
        self.num_bases = num_bases
        self.attention_size = attention_size
        self.use_scale = use_scale
        super().__init__(*args, **kwargs)

    def _init_layers(self) -> None:
        super()._init_layers()
        if not self.use_scale:
            self.scales = nn.ModuleList(nn.Identity() for _ in self.strides)
        # Initialised by FCOSHead's init_cfg (every Conv2d normal, std 0.01, bias 0): AdelaiDet's top_layer init.
        self.top_layer = nn.Conv2d(self.feat_channels, self.num_bases * self.attention_size ** 2, 3, padding=1)

    def forward_single(self, x: Tensor, scale: nn.Module, stride: int) -> Tuple[Tensor, ...]:
        """FCOS's outputs of one level and the box tower's features (B, C, H, W), from which the top
        layer predicts attentions where they are used (``top_layer_at``, ``predict_by_feat``)."""
        cls_score, bbox_pred, cls_feat, reg_feat = super(FCOSHead, self).forward_single(x)
        centerness = self.conv_centerness(reg_feat if self.centerness_on_reg else cls_feat)
        bbox_pred = scale(bbox_pred).float()
        if self.norm_on_bbox:  # distances in strides while training, in pixels at inference
            bbox_pred = bbox_pred.clamp(min=0)
            if not self.training:
                bbox_pred = bbox_pred * stride
        else:
            bbox_pred = bbox_pred.exp()
        return cls_score, bbox_pred, centerness, reg_feat

    def top_layer_at(self, towers: List[Tensor], image: Tensor, point: Tensor) -> Tensor:
        """The top layer's attentions (N, K * M * M) at N locations, each given by its image and its
        index into the levels' concatenated points (row-major per level: the targets' order). The 3x3
        conv is applied at those locations only: training uses a few dozen of them, and the conv at
        every location was a tenth of a CPU iteration."""
        sizes = torch.tensor([t.shape[-2:] for t in towers], device=point.device)  # (L, 2): H, W per level
        first_point = F.pad(sizes.prod(1).cumsum(0), (1, 0))[:-1]
        level = torch.searchsorted(first_point, point, right=True) - 1
        local = point - first_point[level]
        y = local.div(sizes[level, 1], rounding_mode='floor')
        x = local - y * sizes[level, 1]
        # each location's 3x3 window in the levels' towers, zero-padded by 1 and flattened side by side
        row = sizes[level, 1, None] + 2
        first_padded = F.pad((sizes + 2).prod(1).cumsum(0), (1, 0))[:-1]
        shifts = torch.arange(-1, 2, device=point.device)
        window = (first_padded[level, None] + (y[:, None] + 1) * row + x[:, None] + 1 +
                  (shifts[:, None] * row[:, :, None] + shifts).flatten(1))  # (N, 9), row-major like the kernel
        padded = torch.cat([F.pad(t, (1, 1, 1, 1)).flatten(2) for t in towers], 2)
        windows = padded[image[:, None], :, window]  # (N, 9, C)
        return F.linear(windows.transpose(1, 2).flatten(1), self.top_layer.weight.flatten(1), self.top_layer.bias)

    # ------------------------------------------------------------------ training
    def loss_by_feat(self, cls_scores: List[Tensor], bbox_preds: List[Tensor], centernesses: List[Tensor],
                     towers: List[Tensor], batch_gt_instances, batch_img_metas,
                     batch_gt_instances_ignore=None) -> dict:
        """FCOS's losses; keeps each image's positive locations for the mask head."""
        self._assignments = []  # filled per image by _get_targets_single, through get_targets
        losses = super().loss_by_feat(cls_scores, bbox_preds, centernesses, batch_gt_instances,
                                      batch_img_metas, batch_gt_instances_ignore)
        positives = torch.stack([gt_inds for gt_inds, _ in self._assignments]) >= 0  # (B, points)
        image, point = positives.nonzero().unbind(1)
        attentions = self.top_layer_at(towers, image, point).split(positives.sum(1).tolist())
        self._positive_infos = []
        for (gt_inds, bbox_targets), positive, img_attentions in zip(self._assignments, positives, attentions):
            info = InstanceData()
            info.attentions = img_attentions
            info.pos_assigned_gt_inds = gt_inds[positive]
            # AdelaiDet weights each positive's mask loss by its centerness target.
            info.centerness_targets = self.centerness_target(bbox_targets[positive])
            self._positive_infos.append(info)
        return losses

    def get_positive_infos(self) -> List[InstanceData]:
        """Per image, from the last loss call: the positives' attentions (P, K * M * M), assigned
        ground truth (P,) and centerness targets (P,)."""
        return self._positive_infos

    def _get_targets_single(self, gt_instances: InstanceData, points: Tensor, regress_ranges: Tensor,
                            num_points_per_lvl: List[int]) -> Tuple[Tensor, Tensor]:
        """FCOS's assignment of one image (FCOSHead.get_targets calls it per image): the box-centre
        sampling region (stride x radius), the level's regress range and, where several boxes
        qualify, the smallest one. Unlike FCOSHead's it records which ground truth each point got,
        the mask head's target."""
        num_points, num_gts = points.size(0), len(gt_instances)
        boxes, labels = gt_instances.bboxes, gt_instances.labels
        if num_gts == 0:
            self._assignments.append((points.new_full((num_points,), -1, dtype=torch.long),
                                      boxes.new_zeros((num_points, 4))))
            return labels.new_full((num_points,), self.num_classes), boxes.new_zeros((num_points, 4))
        xs, ys = points[:, 0, None], points[:, 1, None]  # (P, 1) against (G,) -> (P, G)
        distances = torch.stack((xs - boxes[:, 0], ys - boxes[:, 1], boxes[:, 2] - xs, boxes[:, 3] - ys), -1)
        if self.center_sampling:
            radius = torch.cat([points.new_full((n,), stride * self.center_sample_radius)
                                for n, stride in zip(num_points_per_lvl, self.strides)])[:, None]
            centre_x, centre_y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
            inside = ((xs > torch.maximum(centre_x - radius, boxes[:, 0])) &
                      (xs < torch.minimum(centre_x + radius, boxes[:, 2])) &
                      (ys > torch.maximum(centre_y - radius, boxes[:, 1])) &
                      (ys < torch.minimum(centre_y + radius, boxes[:, 3])))
        else:
            inside = distances.min(dim=-1).values > 0
        reach = distances.max(dim=-1).values
        in_range = (reach >= regress_ranges[:, :1]) & (reach <= regress_ranges[:, 1:])
        areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(num_points, num_gts)
        min_area, gt_inds = torch.where(inside & in_range, areas, areas.new_tensor(INF)).min(dim=1)
        gt_inds[min_area == INF] = -1
        bbox_targets = distances[torch.arange(num_points, device=points.device), gt_inds.clamp(min=0)]
        self._assignments.append((gt_inds, bbox_targets))
        return torch.where(gt_inds >= 0, labels[gt_inds.clamp(min=0)], self.num_classes), bbox_targets

    # ------------------------------------------------------------------ inference
    def predict_by_feat(self, cls_scores: List[Tensor], bbox_preds: List[Tensor], centernesses: List[Tensor],
                        towers: List[Tensor], batch_img_metas: List[dict], cfg=None,
                        rescale: bool = False, with_nms: bool = True) -> List[InstanceData]:
        """Per image: bboxes, scores, labels and each detection's attentions (for the mask head)."""
        cfg = self.test_cfg if cfg is None else cfg
        attentions = [self.top_layer(tower) for tower in towers]
        points = self.prior_generator.grid_priors([c.shape[-2:] for c in cls_scores], dtype=bbox_preds[0].dtype,
                                                  device=bbox_preds[0].device)
        results_list = []
        for img, img_meta in enumerate(batch_img_metas):
            levels = [self._predict_level(*outputs, level_points, img_meta, cfg) for *outputs, level_points in zip(
                select_single_mlvl(cls_scores, img, detach=True), select_single_mlvl(bbox_preds, img, detach=True),
                select_single_mlvl(centernesses, img, detach=True), select_single_mlvl(attentions, img, detach=True),
                points)]
            results_list.append(self._bbox_post_process(InstanceData.cat(levels), cfg, rescale=rescale,
                                                        with_nms=with_nms, img_meta=img_meta))
        return results_list

    def _predict_level(self, cls_score: Tensor, bbox_pred: Tensor, centerness: Tensor, attention: Tensor,
                       points: Tensor, img_meta: dict, cfg) -> InstanceData:
        """One level's candidates as AdelaiDet's FCOSOutputs with THRESH_WITH_CTR: the threshold and
        the top-k (nms_pre) apply to class score x centerness; the score is its square root."""
        scores = cls_score.permute(1, 2, 0).reshape(-1, self.cls_out_channels).sigmoid()
        scores = scores * centerness.reshape(-1, 1).sigmoid()
        scores, labels, _, kept = filter_scores_and_topk(scores, cfg.score_thr, cfg.nms_pre, dict(
            distances=bbox_pred.permute(1, 2, 0).reshape(-1, 4), points=points,
            attentions=attention.permute(1, 2, 0).reshape(-1, attention.size(0))))
        results = InstanceData()
        results.bboxes = self.bbox_coder.decode(kept['points'], kept['distances'], max_shape=img_meta['img_shape'])
        results.scores = scores.sqrt()
        results.labels = labels
        results.attentions = kept['attentions']
        return results
