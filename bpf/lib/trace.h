/* Decision trace for Test/Explain. policyd runs the live program with BPF_PROG_TEST_RUN and
 * a metadata area in front of the frame; the program writes its decision there and the
 * kernel hands the area back. Real traffic carries no metadata, so it costs one compare. */
#ifndef VPNR_TRACE_H
#define VPNR_TRACE_H

#include "policy.h"

#define VPNR_TRACE_MAGIC 0x76706e72 /* "vpnr" */

struct vpnr_trace {
	__u32 magic;
	__u8 verdict;
	__u8 reason;
	__u8 src_zone;
	__u8 dst_zone;
	__u32 rule_id;
	__u32 binding_id;
	__u32 roleset_id;
	__u16 rule_role;
	__u8 flags;          /* vpnr_decision.flags */
	__u8 reserved;
	__u64 active;        /* policy_active word: slot and version */
};

/* Returns 1 for a traced (test) packet: it is not traffic, so it is neither counted nor
 * audited, and spends no audit tokens. */
static __always_inline int vpnr_trace(struct xdp_md *ctx, const struct vpnr_decision *d)
{
	void *meta = (void *)(long)ctx->data_meta;
	struct vpnr_trace *trace = meta;

	if ((void *)(trace + 1) > (void *)(long)ctx->data)
		return 0;
	if (trace->magic != VPNR_TRACE_MAGIC)
		return 0;
	trace->verdict = d->verdict;
	trace->reason = d->reason;
	trace->src_zone = d->src_zone;
	trace->dst_zone = d->dst_zone;
	trace->rule_id = d->rule_id;
	trace->binding_id = d->binding_id;
	trace->roleset_id = d->roleset_id;
	trace->rule_role = d->rule_role;
	trace->flags = d->flags;
	trace->active = d->active;
	return 1;
}

#endif /* VPNR_TRACE_H */
