// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//
// Storage steering on a shared port: IPv4/IPv6 TCP and UDP frames whose destination port is in
// `steer_ports` are redirected to the AF_XDP socket bound to the frame's receive queue
// (`xsks_map[rx_queue_index]`); every other frame, and every storage frame that arrives on a
// queue without a socket, goes to the kernel stack (XDP_PASS). Nothing is ever dropped here:
// malformed frames are counted and passed, so the kernel keeps its own accounting of them.
//
// The userspace mirror of this parser is `net::classify`; the two are compared
// frame by frame by net/tests/differential.rs, so any change here must be made there too.
//
// Built by ebpf/build.rs with `clang -g -O2 -target bpf` (BTF is needed by the loader).
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

// Kept equal to the constants of the same names in ebpf/src/lib.rs.
#define MAX_QUEUES 64
#define MAX_STEER_PORTS 16
// IPv6 extension headers walked before giving up (counted as malformed). Real traffic carries
// zero to two; the bound keeps the unrolled loop small for the verifier.
#define MAX_IPV6_EXT_HEADERS 6
// 802.1Q / 802.1ad tags skipped (QinQ at most).
#define MAX_VLAN_TAGS 2

#define PROTO_TCP_BIT 1
#define PROTO_UDP_BIT 2

// Indexes of `counters`, in the order of ebpf::Counters.
#define CNT_STEERED 0
#define CNT_PASSED 1
#define CNT_MALFORMED 2
#define CNT_UNBOUND 3
#define CNT_NUM 4

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, MAX_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} xsks_map SEC(".maps");

// Destination port (host byte order) -> mask of PROTO_*_BIT to steer.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_STEER_PORTS);
	__type(key, __u16);
	__type(value, __u8);
} steer_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CNT_NUM);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

struct vlan_hdr {
	__be16 tci;
	__be16 encap_proto;
};

// Generic IPv6 extension header prefix (hop-by-hop, routing, destination options).
struct ipv6_ext {
	__u8 nexthdr;
	__u8 hdrlen;
};

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);
	if (v)
		*v += 1;
}

enum verdict { V_PASS, V_STEER, V_MALFORMED };

// Looks at the L4 header at `l4` for protocol `proto` (IPPROTO_*).
static __always_inline enum verdict check_l4(void *l4, void *data_end, __u8 proto)
{
	__u16 dport;
	__u8 bit;
	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end)
			return V_MALFORMED;
		if (th->doff < 5)
			return V_MALFORMED;
		dport = bpf_ntohs(th->dest);
		bit = PROTO_TCP_BIT;
	} else if (proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end)
			return V_MALFORMED;
		dport = bpf_ntohs(uh->dest);
		bit = PROTO_UDP_BIT;
	} else {
		return V_PASS;
	}
	__u8 *mask = bpf_map_lookup_elem(&steer_ports, &dport);
	if (mask && (*mask & bit))
		return V_STEER;
	return V_PASS;
}

static __always_inline enum verdict classify_ipv4(void *l3, void *data_end)
{
	struct iphdr *iph = l3;
	if ((void *)(iph + 1) > data_end)
		return V_MALFORMED;
	if (iph->version != 4 || iph->ihl < 5)
		return V_MALFORMED;
	// Fragments go to the kernel, which reassembles them: steering only the first one would
	// split a datagram between two receivers.
	if (iph->frag_off & bpf_htons(0x3fff))
		return V_PASS;
	__u32 hlen = iph->ihl * 4;
	void *l4 = l3 + hlen;
	if (l4 > data_end)
		return V_MALFORMED;
	return check_l4(l4, data_end, iph->protocol);
}

static __always_inline enum verdict classify_ipv6(void *l3, void *data_end)
{
	struct ipv6hdr *ip6 = l3;
	if ((void *)(ip6 + 1) > data_end)
		return V_MALFORMED;
	if (ip6->version != 6)
		return V_MALFORMED;
	__u8 next = ip6->nexthdr;
	void *p = (void *)(ip6 + 1);
#pragma unroll
	for (int i = 0; i < MAX_IPV6_EXT_HEADERS; i++) {
		if (next == IPPROTO_TCP || next == IPPROTO_UDP)
			return check_l4(p, data_end, next);
		struct ipv6_ext *ext = p;
		switch (next) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			if ((void *)(ext + 1) > data_end)
				return V_MALFORMED;
			next = ext->nexthdr;
			p += ((__u32)ext->hdrlen + 1) * 8;
			break;
		case IPPROTO_AH:
			if ((void *)(ext + 1) > data_end)
				return V_MALFORMED;
			next = ext->nexthdr;
			p += ((__u32)ext->hdrlen + 2) * 4;
			break;
		case IPPROTO_FRAGMENT:
			// As for IPv4: fragmented datagrams are the kernel's.
			return V_PASS;
		default:
			// ICMPv6 (neighbour discovery), ESP, no-next-header, anything else.
			return V_PASS;
		}
		if (p > data_end)
			return V_MALFORMED;
	}
	if (next == IPPROTO_TCP || next == IPPROTO_UDP)
		return check_l4(p, data_end, next);
	if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS ||
	    next == IPPROTO_AH)
		return V_MALFORMED; // chain longer than MAX_IPV6_EXT_HEADERS
	return V_PASS;
}

static __always_inline enum verdict classify(void *data, void *data_end)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return V_MALFORMED;
	__be16 proto = eth->h_proto;
	void *p = (void *)(eth + 1);
#pragma unroll
	for (int i = 0; i < MAX_VLAN_TAGS; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		struct vlan_hdr *vh = p;
		if ((void *)(vh + 1) > data_end)
			return V_MALFORMED;
		proto = vh->encap_proto;
		p = (void *)(vh + 1);
	}
	if (proto == bpf_htons(ETH_P_IP))
		return classify_ipv4(p, data_end);
	if (proto == bpf_htons(ETH_P_IPV6))
		return classify_ipv6(p, data_end);
	return V_PASS; // ARP, LLDP, a third VLAN tag, ...
}

SEC("xdp")
int storage_steer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	enum verdict v = classify(data, data_end);
	if (v == V_MALFORMED) {
		count(CNT_MALFORMED);
		return XDP_PASS;
	}
	if (v == V_PASS) {
		count(CNT_PASSED);
		return XDP_PASS;
	}
	// The low bits of the flags are the action when the queue has no socket (kernel >= 5.3).
	long act = bpf_redirect_map(&xsks_map, ctx->rx_queue_index, XDP_PASS);
	if (act == XDP_REDIRECT)
		count(CNT_STEERED);
	else
		count(CNT_UNBOUND);
	return act;
}

// Dual-licensed; the kernel is told the GPL side (no GPL-only helper is used today).
char _license[] SEC("license") = "GPL";
