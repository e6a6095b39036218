"""What the ranks compute on: tokens, weights and the MoE stacks (``tokens``), skewed routing
(``skew``) and recorded routing traces (``trace``)."""
