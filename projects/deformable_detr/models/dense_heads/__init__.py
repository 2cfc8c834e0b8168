from .deformable_detr_head import DeformableDETRHead, proposal_branch_index, select_top_k

__all__ = ['DeformableDETRHead', 'proposal_branch_index', 'select_top_k']
