"""TEMP shim (replaced by the helper's module)."""
import torch
class SavedTensors:
    def __init__(self, params):
        self.skip = {p.untyped_storage().data_ptr() for p in params}; self.seen = {}
    def __enter__(self):
        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in self.skip: self.seen[st.data_ptr()] = st.nbytes()
            return t
        self.ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t); self.ctx.__enter__(); return self
    def __exit__(self, *a): self.ctx.__exit__(*a)
    @property
    def bytes(self): return sum(self.seen.values())
def tensor_bytes(ts):
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}.values())
def optimizer_state_bytes(opt):
    return tensor_bytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
