// SPDX-License-Identifier: GPL-2.0
/*
 * MOAT's eBPF GRE data plane (issue 16): RFC 2784/2890 GRE with a key, in tc programs, for
 * kernels without ip_gre. Built from this source by agent/mobility/tunnel/ebpf_build.py
 * (clang -target bpf) and loaded with bpftool (maps pinned under a run-scoped bpffs path);
 * the agent keeps the maps in step with its bindings and visitors.
 *
 * moat_encap: clsact egress of the tunnel device (a veth whose other end is unused). The
 *   kernel routes an away object's home address (HOA) or a reverse-tunnelled visitor's
 *   source (FOA, policy rule) into that device; the program grows the packet by an outer
 *   IPv4 + keyed GRE header, and sends one copy per peer (bicast): bpf_clone_redirect for
 *   every copy but the last, bpf_redirect for the last, each to the interface and next hop
 *   the FIB gives for its remote.
 * moat_decap: clsact ingress of every other interface. GRE to the tunnel's local address
 *   is decapsulated only from an accepted (outer source, key), only for a destination the
 *   pair may carry (an FOA's visitor), and handed to the tunnel device's ingress, so the
 *   kernel routes it as received on the tunnel (as the other backends do), or as a frame
 *   to an on-link router (set_delivery). Anything else GRE to the local address is dropped
 *   and counted; other traffic passes untouched.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7) /* Linux >= 6.3; older headers lack it */
#endif

#define MAX_PEERS 4          /* simultaneous bindings of one home address (bicast) */
#define GRE_FLAG_C 0x8000
#define GRE_FLAG_R 0x4000
#define GRE_FLAG_K 0x2000
#define GRE_FLAG_S 0x1000
#define GRE_VERSION 0x0007
#define OUTER_LEN (sizeof(struct iphdr) + 8)  /* outer IPv4 + GRE with key */
#define IP_DF 0x4000
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

/* Counters, indexed as STAT_KEYS in agent/mobility/tunnel/ebpf_maps.py. */
enum {
	S_ENCAPSULATED, S_COPIES_SENT, S_DECAPSULATED, S_DROPPED_UNKNOWN_PEER,
	S_DROPPED_MALFORMED, S_DROPPED_NO_PEER, S_DROPPED_SEND_ERROR, S_DROPPED_LOOP,
	S_DROPPED_NOT_VISITOR, S_REROUTED, S_MAX
};

#define ACCEPT_RESTRICTED 1  /* only destinations in `allowed` */
#define ACCEPT_DELIVER 2     /* as a frame to an on-link router, not through the tunnel device */

struct peer {
	__u32 remote;  /* network order */
	__u32 key;     /* host order */
};

struct peers {
	__u32 count;
	struct peer peer[MAX_PEERS];
};

struct accept_key {
	__u32 remote;
	__u32 key;
};

struct accept_val {
	__u32 flags;
	__u32 ifindex;     /* ACCEPT_DELIVER: the interface of the on-link router */
	__u8 dmac[6];      /* ... its MAC */
	__u8 smac[6];      /* ... and the interface's own */
};

struct allowed_key {
	__u32 remote;
	__u32 key;
	__u32 dst;
};

struct config {
	__u32 local;       /* network order: the outer source, and the only GRE destination */
	__u32 tun_ifindex; /* the tunnel device: decapsulated packets enter there */
	__u8 tun_mac[6];
	__u8 pad[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct peers);
} moat_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct peer);
} moat_reverse SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct accept_key);
	__type(value, struct accept_val);
} moat_accepted SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct allowed_key);
	__type(value, __u8);
} moat_allowed SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} moat_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, S_MAX);
	__type(key, __u32);
	__type(value, __u64);
} moat_stats SEC(".maps");

static __always_inline void count(__u32 what, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&moat_stats, &what);

	if (v)
		*v += n;
}

static __always_inline __u16 ip_checksum(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

struct outer {
	struct iphdr ip;
	__be16 flags;
	__be16 proto;
	__be32 key;
};

/* Send the (already encapsulated) packet to `remote`: clone it there, or redirect it. */
static __always_inline int send_copy(struct __sk_buff *skb, struct outer *o, __u32 remote,
				     __u32 key, __u32 local, int last)
{
	struct bpf_fib_lookup fib = {};
	int rc;

	o->ip.daddr = remote;
	o->ip.check = 0;
	o->ip.check = ip_checksum(&o->ip);
	o->key = bpf_htonl(key);
	if (bpf_skb_store_bytes(skb, ETH_HLEN, o, sizeof(*o), 0) < 0)
		goto error;
	fib.family = 2; /* AF_INET */
	fib.l4_protocol = IPPROTO_GRE;
	fib.ipv4_src = local;
	fib.ipv4_dst = remote;
	fib.ifindex = skb->ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (fib.ifindex == skb->ifindex) {  /* the remote is routed into the tunnel */
			count(S_DROPPED_LOOP, 1);
			return -1;
		}
		if (bpf_skb_store_bytes(skb, 0, fib.dmac, 6, 0) < 0 ||
		    bpf_skb_store_bytes(skb, 6, fib.smac, 6, 0) < 0)
			goto error;
		if (!last)
			return bpf_clone_redirect(skb, fib.ifindex, 0) == 0 ? 0 : -1;
		return bpf_redirect(fib.ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH && last) {
		/* the next hop's MAC is not known yet: the kernel resolves it */
		if (fib.ifindex == skb->ifindex) {
			count(S_DROPPED_LOOP, 1);
			return -1;
		}
		return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
	}
error:
	count(S_DROPPED_SEND_ERROR, 1);
	return -1;
}

SEC("tc")
int moat_encap(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;
	struct peers one = {};
	struct peers *peers;
	struct config *cfg;
	struct outer o = {};
	__u32 zero = 0, dst, src;
	__u8 proto, tos;
	int sent = 0, rc;

	if (skb->protocol != bpf_htons(ETH_P_IP) || (void *)(ip + 1) > data_end ||
	    eth->h_proto != bpf_htons(ETH_P_IP) || ip->version != 4 || ip->ihl < 5) {
		count(S_DROPPED_MALFORMED, 1);
		return TC_ACT_SHOT;
	}
	dst = ip->daddr;
	src = ip->saddr;
	proto = ip->protocol;
	tos = ip->tos;
	cfg = bpf_map_lookup_elem(&moat_config, &zero);
	if (!cfg || !cfg->local) {
		count(S_DROPPED_NO_PEER, 1);
		return TC_ACT_SHOT;
	}
	peers = bpf_map_lookup_elem(&moat_peers, &dst);
	if (!peers) {
		struct peer *rev = bpf_map_lookup_elem(&moat_reverse, &src);

		if (!rev) {
			count(S_DROPPED_NO_PEER, 1);
			return TC_ACT_SHOT;
		}
		one.count = 1;
		one.peer[0] = *rev;
		peers = &one;
	}
	__u32 n = peers->count;
	if (n == 0)  /* no peer: the agent removes the route into the device first */
		goto no_peer;
	if (n > MAX_PEERS) {
no_peer:
		count(S_DROPPED_NO_PEER, 1);
		return TC_ACT_SHOT;
	}
	/* copy the peers: the map entry may change under us, and helpers invalidate nothing */
	struct peer list[MAX_PEERS];
#pragma unroll
	for (int i = 0; i < MAX_PEERS; i++)
		list[i] = peers->peer[i];
	if (proto == IPPROTO_GRE) {
#pragma unroll
		for (int i = 0; i < MAX_PEERS; i++) {
			if (i < n && list[i].remote == dst) {  /* our own GRE came back */
				count(S_DROPPED_LOOP, 1);
				return TC_ACT_SHOT;
			}
		}
	}
	if (bpf_skb_adjust_room(skb, OUTER_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
				BPF_F_ADJ_ROOM_ENCAP_L4_GRE)) {
		count(S_DROPPED_SEND_ERROR, 1);
		return TC_ACT_SHOT;
	}
	o.ip.version = 4;
	o.ip.ihl = 5;
	o.ip.tos = 0;
	o.ip.tot_len = bpf_htons(skb->len - ETH_HLEN);
	o.ip.id = 0;
	o.ip.frag_off = bpf_htons(IP_DF);
	o.ip.ttl = 64;
	o.ip.protocol = IPPROTO_GRE;
	o.ip.saddr = cfg->local;
	o.flags = bpf_htons(GRE_FLAG_K);
	o.proto = bpf_htons(ETH_P_IP);
	(void)tos;
	count(S_ENCAPSULATED, 1);
	rc = TC_ACT_SHOT;
	for (int i = 0; i < MAX_PEERS; i++) {
		if (i >= n)
			break;
		int last = i == n - 1;
		int r = send_copy(skb, &o, list[i].remote, list[i].key, cfg->local, last);

		if (last) {
			if (r == TC_ACT_REDIRECT) {
				sent++;
				rc = TC_ACT_REDIRECT;
			}
		} else if (r == 0) {
			sent++;
		}
	}
	if (sent)
		count(S_COPIES_SENT, sent);
	return rc;
}

SEC("tc")
int moat_decap(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;
	struct config *cfg;
	struct accept_key ak;
	struct accept_val *acc;
	__u32 zero = 0, olen, glen = 4, key = 0, inner_dst;
	__u16 gflags;
	int has_key;

	if (skb->protocol != bpf_htons(ETH_P_IP) || (void *)(ip + 1) > data_end)
		return TC_ACT_OK;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->protocol != IPPROTO_GRE)
		return TC_ACT_OK;
	cfg = bpf_map_lookup_elem(&moat_config, &zero);
	if (!cfg || !cfg->local || ip->daddr != cfg->local)
		return TC_ACT_OK;  /* not ours: the kernel routes it on */
	if (ip->version != 4 || ip->ihl < 5 || (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))) {
		count(S_DROPPED_MALFORMED, 1);
		return TC_ACT_SHOT;
	}
	olen = ip->ihl * 4;
	if (olen > 60)
		return TC_ACT_SHOT;
	__u32 gre_off = ETH_HLEN + olen;
	__u8 *gre = data + gre_off;
	if ((void *)(gre + 4) > data_end) {
		count(S_DROPPED_MALFORMED, 1);
		return TC_ACT_SHOT;
	}
	gflags = ((__u16)gre[0] << 8) | gre[1];
	if ((gflags & (GRE_FLAG_R | GRE_VERSION)) || gre[2] != 0x08 || gre[3] != 0x00) {
		count(S_DROPPED_MALFORMED, 1);  /* version 0, no routing, IPv4 inside (RFC 2784) */
		return TC_ACT_SHOT;
	}
	if (gflags & GRE_FLAG_C)
		glen += 4;
	has_key = !!(gflags & GRE_FLAG_K);
	if (has_key) {
		__u8 *k = gre + glen;

		if ((void *)(k + 4) > data_end) {
			count(S_DROPPED_MALFORMED, 1);
			return TC_ACT_SHOT;
		}
		key = ((__u32)k[0] << 24) | ((__u32)k[1] << 16) | ((__u32)k[2] << 8) | k[3];
		glen += 4;
	}
	if (gflags & GRE_FLAG_S)
		glen += 4;
	struct iphdr *inner = (void *)(gre + glen);
	if ((void *)(inner + 1) > data_end || inner->version != 4 || inner->ihl < 5) {
		count(S_DROPPED_MALFORMED, 1);
		return TC_ACT_SHOT;
	}
	if (bpf_ntohs(ip->tot_len) < olen + glen + bpf_ntohs(inner->tot_len)) {
		count(S_DROPPED_MALFORMED, 1);  /* the inner packet does not fit the outer one */
		return TC_ACT_SHOT;
	}
	inner_dst = inner->daddr;
	if (!has_key) {
		count(S_DROPPED_UNKNOWN_PEER, 1);
		return TC_ACT_SHOT;
	}
	ak.remote = ip->saddr;
	ak.key = key;
	acc = bpf_map_lookup_elem(&moat_accepted, &ak);
	if (!acc) {
		count(S_DROPPED_UNKNOWN_PEER, 1);
		return TC_ACT_SHOT;
	}
	if (acc->flags & ACCEPT_RESTRICTED) {
		struct allowed_key al = {.remote = ak.remote, .key = key, .dst = inner_dst};

		if (!bpf_map_lookup_elem(&moat_allowed, &al)) {
			count(S_DROPPED_NOT_VISITOR, 1);
			return TC_ACT_SHOT;
		}
	}
	__u32 flags = acc->flags, ifindex = acc->ifindex;
	__u8 dmac[6], smac[6];
	__builtin_memcpy(dmac, acc->dmac, 6);
	__builtin_memcpy(smac, acc->smac, 6);
	/* the outer IPv4 + GRE go; the Ethernet header stays (rewritten below) */
	if (bpf_skb_adjust_room(skb, -(__s32)(olen + glen), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_DECAP_L3_IPV4) &&
	    bpf_skb_adjust_room(skb, -(__s32)(olen + glen), BPF_ADJ_ROOM_MAC, 0)) {
		count(S_DROPPED_MALFORMED, 1);
		return TC_ACT_SHOT;
	}
	if (flags & ACCEPT_DELIVER) {
		if (bpf_skb_store_bytes(skb, 0, dmac, 6, 0) < 0 ||
		    bpf_skb_store_bytes(skb, 6, smac, 6, 0) < 0) {
			count(S_DROPPED_SEND_ERROR, 1);
			return TC_ACT_SHOT;
		}
		count(S_DECAPSULATED, 1);
		return bpf_redirect(ifindex, 0);
	}
	if (bpf_skb_store_bytes(skb, 0, cfg->tun_mac, 6, 0) < 0) {
		count(S_DROPPED_SEND_ERROR, 1);
		return TC_ACT_SHOT;
	}
	count(S_DECAPSULATED, 1);
	return bpf_redirect(cfg->tun_ifindex, BPF_F_INGRESS);
}

char LICENSE[] SEC("license") = "GPL";
