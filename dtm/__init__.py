"""Disperse-Then-Merge: a UI-free library for the DTM method of instruction tuning.

Fu et al., "Disperse-Then-Merge: Pushing the Limits of Instruction Tuning via
Alignment Tax Reduction", ACL Findings 2024 (arXiv 2405.13432).

Data flows one way: file -> table -> embeddings -> assignment -> runs ->
adapters -> merged model -> scores. Each arrow is a function here whose output
is a registry row plus files under the cache, keyed by the hash of its inputs.
"""

__version__ = "0.1.0"
