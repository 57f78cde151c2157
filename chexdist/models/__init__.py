"""Models: architecture facts, the factory (timm + torchvision DenseNet-121), weights I/O."""
