"""bertrec's copy of the Open Inference Protocol (proto package `inference`)."""
