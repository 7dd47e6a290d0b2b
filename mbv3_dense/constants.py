"""Constants shared by the three tasks."""

# ImageNet statistics: the classifier, SSDLite's backbone and LR-ASPP expect inputs normalised with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
