/* BPF_PROG_TEST_RUN harness of the response parser of dp_return.h (sched_cls:
 * sk_skb programs have no test runs on 6.18, -ENOTSUPP).
 *
 * Owner: envoyreturn; used only by tests/kernel_datapath/test_return_parser.py,
 * which builds datapath.h + dp_return.h + this file with -DDP_RSP_BASE=14 (the
 * test packet is a 14-byte dummy Ethernet header, then the response bytes)
 * and feeds a response stream segment by segment into entry 0 of dp_ret.
 */

int tr_scan(struct __sk_buff *skb)
{
    dp_rsp_scan(skb, 0);
    return 0;
}
