/* The DPDK 22.11 API used by net::dpdk; bindgen reads this with
 * `-include rte_config.h` (as pkg-config's cflags do). */
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>
