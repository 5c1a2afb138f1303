"""ntk_scale: neural tangent kernels under benign and adversarial training, from a laptop to a pod."""
