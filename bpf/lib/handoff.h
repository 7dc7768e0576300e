/* What the first stage of the XDP program hands the rule-scan stage (a tail call). */
#ifndef VPNR_HANDOFF_H
#define VPNR_HANDOFF_H

#include "parse.h"
#include "policy.h"

struct vpnr_handoff {
	struct vpnr_packet pkt;
	struct vpnr_decision d;
	struct vpnr_scan scan;
};

/* Per CPU: an XDP program and its tail calls run to completion on one CPU. */
BPF_PERCPU_ARRAY(xdp_handoff, struct vpnr_handoff, 1);

#endif /* VPNR_HANDOFF_H */
