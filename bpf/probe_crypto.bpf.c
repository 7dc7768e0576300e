// SPDX-License-Identifier: GPL-2.0
/*
 * probe_crypto.bpf.c - asks the running kernel whether bpf_crypto_ctx_create()
 * accepts a given (type, algo, key_len, authsize) tuple.
 *
 * Loaded by services/tunneld/probe.py as a BPF_PROG_TYPE_SYSCALL program and
 * run with BPF_PROG_TEST_RUN once per candidate: ctx_in is a filled
 * struct bpf_crypto_params, the program's return value (test.retval) is 0 if
 * the kernel created a crypto context, else the negative errno it reported.
 *
 * Built without vmlinux.h or libbpf headers (neither is needed for two kfuncs
 * and one struct); the layout below is checked against kernel BTF by probe.py.
 */

typedef unsigned char __u8;
typedef unsigned int __u32;

#define SEC(name) __attribute__((section(name), used))
/* libbpf resolves externs placed in .ksyms against kernel BTF (kfuncs). */
#define __ksym __attribute__((section(".ksyms")))

/* Must match the kernel's struct bpf_crypto_params byte for byte (408 bytes). */
struct bpf_crypto_params {
	char type[14];
	__u8 reserved[2];
	char algo[128];
	__u8 key[256];
	__u32 key_len;
	__u32 authsize;
};

_Static_assert(sizeof(struct bpf_crypto_params) == 408, "bpf_crypto_params layout");

/*
 * Opaque to us, but it needs a body: libbpf (1.1) rejects the kfunc prototype
 * as "incompatible with kernel" when the return type is only a forward decl.
 */
struct bpf_crypto_ctx {
	int opaque;
};

extern struct bpf_crypto_ctx *
bpf_crypto_ctx_create(const struct bpf_crypto_params *params, __u32 params__sz,
		      int *err) __ksym;
extern void bpf_crypto_ctx_release(struct bpf_crypto_ctx *ctx) __ksym;

/* The verifier only lets GPL-compatible programs call kfuncs. */
char LICENSE[] SEC("license") = "GPL";

/* "syscall" makes libbpf load it sleepable, which bpf_crypto_ctx_create requires. */
SEC("syscall")
int probe_crypto(struct bpf_crypto_params *ctx)
{
	struct bpf_crypto_ctx *cctx;
	int err = 0;

	/*
	 * Hand the syscall ctx straight to the kfunc: the verifier records a
	 * 408-byte ctx access and BPF_PROG_TEST_RUN then refuses a shorter
	 * ctx_in. (A stack copy does not fit: clang exceeds the 512-byte stack.)
	 */
	cctx = bpf_crypto_ctx_create(ctx, sizeof(*ctx), &err);
	if (!cctx)
		return err ? err : -1; /* -1 (EPERM) only if the kernel gave no reason */

	/* Acquired reference must be dropped or the verifier rejects the program. */
	bpf_crypto_ctx_release(cctx);
	return 0;
}
