"""The shapes world, ctxdiff's CPU-scale laboratory and the bundled model's data: captions
(`captions`), scenes and videos (`world`), drawing (`render`), training data (`datasets`) and a
judge that checks an image against its caption (`judge`)."""
