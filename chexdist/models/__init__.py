"""Models: `arch` (architecture facts: normalization, input sizes, classifier and Grad-CAM layers; a
leaf), `factory` (timm + torchvision DenseNet-121, heads) and `weights` (local weights I/O)."""
