/* One token bucket step, shared by the audit limiter (per role and CPU) and the handshake
 * limiter (per source address). Tokens are counted in 1e9ths so a rate in units per second
 * times nanoseconds elapsed needs no division on the hot path. */
#ifndef VPNR_BUCKET_H
#define VPNR_BUCKET_H

#define VPNR_NS_PER_SEC 1000000000ULL

/* Refill for the time since *last_ns, then take one token; returns 1 when one was there.
 * The gap is compared with the fill time before multiplying: a long gap (or the first use,
 * last_ns = 0) times the rate would overflow 64 bits. */
static __always_inline int vpnr_bucket_take(__u64 *tokens, __u64 *last_ns, __u64 burst,
					    __u64 rate, __u64 now)
{
	__u64 cap = burst * VPNR_NS_PER_SEC;
	__u64 elapsed = now - *last_ns, have;

	if (now < *last_ns || elapsed >= cap / rate)
		have = cap;
	else
		have = *tokens + elapsed * rate;
	if (have > cap)
		have = cap;
	*last_ns = now;
	if (have < VPNR_NS_PER_SEC) {
		*tokens = have;
		return 0;
	}
	*tokens = have - VPNR_NS_PER_SEC;
	return 1;
}

#endif /* VPNR_BUCKET_H */
