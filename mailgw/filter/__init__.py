"""
The content path around the queue: the after-queue content filter stage
(L{mailgw.filter.stage}), the reinjection listener's pieces
(L{mailgw.filter.reinject}) and their settings (L{mailgw.filter.settings}).
docs/content-filter.md is the operator's guide.
"""
