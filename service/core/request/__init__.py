"""The request path every protocol shares, as stages a reader follows in order.

1. admission.py   refuse before any work: the upload's place and bytes, the image count, room in the queue
2. decoding.py    encoded images to the model's input tensors, on the decode pool
3. batching.py    one task per model version owns its queue and forms batches
4. inference.py   the model itself: an ONNX Runtime session, IO binding, warm-up
5. postprocess.py from outputs to answers: probabilities, top-k, normalised embeddings

path.py runs them in that order for one request (`run`), whatever protocol carried it.
"""
