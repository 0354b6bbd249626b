/*
 * The test guest: a command agent that the `guests` suite copies into
 * donated pages and runs at guest EL1, MMU off, at its first byte.
 * Position independent (only PC-relative branches and `adr`), no stack, no
 * FP/SIMD (CPACR_EL1 is 0 in a fresh vCPU), aligned 8-byte accesses only
 * (with the MMU off data accesses are Device memory). Offset 0x200 holds
 * an exception vector (op 14), so the guest runs from a page boundary.
 *
 * Protocol (tests/hostkernel/src/suites/guests.rs, `Guest`):
 *   - at entry it reports (HELLO, x0): x0 is the VCPU_INIT argument;
 *   - then, for ever: it reads a command from the mailbox, four 8-byte
 *     MMIO reads at MBOX + 0, 8, 16, 24 (op, a1, a2, a3) that the host
 *     completes, runs it and reports (r1, r2);
 *   - a report is a vendor call REPORT (x0 = 0xC6000FF0, x1 = r1, x2 = r2)
 *     that keel does not handle: a HYPERCALL exit with x3 = r1, x4 = r2.
 */
    .section .rodata.keel_guest, "a"
    .balign 16
    .global keel_guest_start
    .global keel_guest_end
keel_guest_start:
    b       2f

    /* The EL1h synchronous vector while op 14 runs (VBAR_EL1 is then the
     * guest's first byte, page aligned): records ESR_EL1 in x5 and skips
     * the instruction that raised it. */
    .org    0x200
    mrs     x5, esr_el1
    mrs     x6, elr_el1
    add     x6, x6, #4
    msr     elr_el1, x6
    eret

    /* The EL1h IRQ vector while op 17 runs: acknowledges the interrupt
     * (ICC_IAR1_EL1), turns the virtual timer off if it was the timer's
     * (PPI 27), so that its level falls, ends it (ICC_EOIR1_EL1), counts
     * it in x6 and appends its INTID to x7 (10 bits each). */
    .org    0x280
    mrs     x5, s3_0_c12_c12_0
    cmp     x5, #27
    b.ne    3f
    msr     cntv_ctl_el0, xzr
3:  msr     s3_0_c12_c12_1, x5
    add     x6, x6, #1
    lsl     x7, x7, #10
    orr     x7, x7, x5
    eret

2:  mov     x20, x0
    movz    x19, #0x0a00, lsl #16           /* MBOX IPA 0x0a000000 */
    mov     x1, x20
    movz    x2, #0x4845                     /* "HE": hello */
    bl      99f

1:  /* next command */
    ldr     x10, [x19]
    ldr     x11, [x19, #8]
    ldr     x12, [x19, #16]
    ldr     x13, [x19, #24]
    cmp     x10, #1
    b.eq    10f
    cmp     x10, #2
    b.eq    20f
    cmp     x10, #3
    b.eq    30f
    cmp     x10, #4
    b.eq    40f
    cmp     x10, #5
    b.eq    50f
    cmp     x10, #6
    b.eq    60f
    cmp     x10, #7
    b.eq    70f
    cmp     x10, #8
    b.eq    80f
    cmp     x10, #9
    b.eq    90f
    cmp     x10, #10
    b.eq    100f
    cmp     x10, #11
    b.eq    110f
    cmp     x10, #12
    b.eq    120f
    cmp     x10, #13
    b.eq    130f
    cmp     x10, #14
    b.eq    140f
    cmp     x10, #15
    b.eq    150f
    cmp     x10, #16
    b.eq    160f
    cmp     x10, #17
    b.eq    170f
    cmp     x10, #18
    b.eq    180f
    /* unknown: report (-1, op) */
    mov     x1, #-1
    mov     x2, x10
    bl      99f
    b       1b

10: /* HVC: x0 = a1, x1 = a2, x2 = a3, x3 = a3; report (x0, x1) */
    mov     x0, x11
    mov     x1, x12
    mov     x2, x13
    mov     x3, x13
    hvc     #0
    mov     x2, x1
    mov     x1, x0
    bl      99f
    b       1b

20: /* SMC: as HVC */
    mov     x0, x11
    mov     x1, x12
    mov     x2, x13
    smc     #0
    mov     x2, x1
    mov     x1, x0
    bl      99f
    b       1b

30: /* WRITE: [a1] = a2; report (0, 0) */
    str     x12, [x11]
    mov     x1, #0
    mov     x2, #0
    bl      99f
    b       1b

40: /* READ: report ([a1], 0) */
    ldr     x1, [x11]
    mov     x2, #0
    bl      99f
    b       1b

50: /* FILL: for each 8 bytes at addr in [a1, a1 + a2): addr ^ a3; report (0, 0) */
    cbz     x12, 52f
51: eor     x14, x11, x13
    str     x14, [x11], #8
    subs    x12, x12, #8
    b.hi    51b
52: mov     x1, #0
    mov     x2, #0
    bl      99f
    b       1b

60: /* CHECK: as FILL's pattern; report (0, 0), or (1, first bad address) */
    cbz     x12, 62f
61: ldr     x14, [x11]
    eor     x15, x11, x13
    cmp     x14, x15
    b.ne    63f
    add     x11, x11, #8
    subs    x12, x12, #8
    b.hi    61b
62: mov     x1, #0
    mov     x2, #0
    bl      99f
    b       1b
63: mov     x1, #1
    mov     x2, x11
    bl      99f
    b       1b

70: /* SHARE_LOOP: a2 times MEM_SHARE + MEM_UNSHARE of the page at a1, timed
     * with CNTVCT_EL0; report (ticks, 0), or (-1, status) at a failure */
    isb
    mrs     x21, cntvct_el0
    cbz     x12, 72f
71: movz    x0, #3
    movk    x0, #0xc600, lsl #16            /* MEM_SHARE */
    mov     x1, x11
    mov     x2, #0
    hvc     #0
    cbnz    x0, 73f
    movz    x0, #4
    movk    x0, #0xc600, lsl #16            /* MEM_UNSHARE */
    mov     x1, x11
    mov     x2, #0
    hvc     #0
    cbnz    x0, 73f
    subs    x12, x12, #1
    b.ne    71b
72: isb
    mrs     x22, cntvct_el0
    sub     x1, x22, x21
    mov     x2, #0
    bl      99f
    b       1b
73: mov     x2, x0
    mov     x1, #-1
    bl      99f
    b       1b

80: /* MMIO_READ at a1 into x5, by a2: 0 ldr x5, 1 ldr w5, 2 ldrb w5,
     * 3 ldrsh x5; x5 starts as a3; report (x5, 0) */
    mov     x5, x13
    cmp     x12, #1
    b.eq    81f
    cmp     x12, #2
    b.eq    82f
    cmp     x12, #3
    b.eq    83f
    ldr     x5, [x11]
    b       84f
81: ldr     w5, [x11]
    b       84f
82: ldrb    w5, [x11]
    b       84f
83: ldrsh   x5, [x11]
84: mov     x1, x5
    mov     x2, #0
    bl      99f
    b       1b

90: /* MMIO_WRITE of a2 at a1 from x7, by a3: 0 str x7, 1 str w7, 2 strb w7 */
    mov     x7, x12
    cmp     x13, #1
    b.eq    91f
    cmp     x13, #2
    b.eq    92f
    str     x7, [x11]
    b       93f
91: str     w7, [x11]
    b       93f
92: strb    w7, [x11]
93: mov     x1, #0
    mov     x2, #0
    bl      99f
    b       1b

100: /* CONSOLE: the message below, byte by byte, to the UART IPA
      * 0x09000000; report (bytes written, 0) */
    movz    x9, #0x0900, lsl #16
    adr     x10, 109f
    mov     x1, #0
101: ldrb   w11, [x10], #1
    cbz     w11, 102f
    strb    w11, [x9]
    add     x1, x1, #1
    b       101b
102: mov    x2, #0
    bl      99f
    b       1b

110: /* FAULT: a load pair from a1 (no instruction syndrome: keel cannot
      * emulate it); reports (x1, x2) only if it does not fault */
    ldp     x1, x2, [x11]
    bl      99f
    b       1b

120: /* REGS: x4..x17 and x19..x28 keep their values across an HVC from
      * the guest (the call in a1, a2, a3): xn = a1 + n for x4..x10 and
      * x14..x17 (x11..x13 hold the arguments), each checked;
      * report (0, status) or (1, first bad register number) */
    add     x4, x11, #4
    add     x5, x11, #5
    add     x6, x11, #6
    add     x7, x11, #7
    add     x8, x11, #8
    add     x9, x11, #9
    add     x10, x11, #10
    add     x14, x11, #14
    add     x15, x11, #15
    add     x16, x11, #16
    add     x17, x11, #17
    mov     x21, x11
    mov     x0, x11
    mov     x1, x12
    mov     x2, x13
    hvc     #0
    mov     x22, x0
    .irp    n, 4, 5, 6, 7, 8, 9, 10, 14, 15, 16, 17
    mov     x1, #\n
    add     x23, x21, #\n
    cmp     x\n, x23
    b.ne    121f
    .endr
    mov     x1, #0
    mov     x2, x22
    bl      99f
    b       1b
121: mov    x2, x1
    mov     x1, #1
    bl      99f
    b       1b

130: /* SYSREGS, by a1: 0 (ID_AA64PFR0_EL1, ID_AA64PFR1_EL1),
      * 1 (ID_AA64DFR0_EL1, ID_AA64ZFR0_EL1), 2 (ID_AA64ISAR0_EL1,
      * ID_AA64MMFR0_EL1), 3 (ID_PFR0_EL1, ID_AA64SMFR0_EL1), 4: writes a2
      * to MDSCR_EL1 and PMCR_EL0, then (MDSCR_EL1, PMCR_EL0) */
    cmp     x11, #1
    b.eq    131f
    cmp     x11, #2
    b.eq    132f
    cmp     x11, #3
    b.eq    133f
    cmp     x11, #4
    b.eq    134f
    mrs     x1, s3_0_c0_c4_0
    mrs     x2, s3_0_c0_c4_1
    b       135f
131: mrs    x1, s3_0_c0_c5_0
    mrs     x2, s3_0_c0_c4_4
    b       135f
132: mrs    x1, s3_0_c0_c6_0
    mrs     x2, s3_0_c0_c7_0
    b       135f
133: mrs    x1, s3_0_c0_c1_0
    mrs     x2, s3_0_c0_c4_5
    b       135f
134: msr    mdscr_el1, x12
    msr     pmcr_el0, x12
    mrs     x1, mdscr_el1
    mrs     x2, pmcr_el0
135: bl     99f
    b       1b

140: /* UNDEF, by a1: 0 MRS ACTLR_EL1 (trapped by keel, not emulated),
      * 1 SVE's RDVL with CPACR_EL1 letting SVE and FP through (so keel's
      * CPTR_EL2 trap takes it); report (ESR_EL1 the vector saw, or -1 if
      * it did not run, 0) */
    mov     x5, #-1
    adr     x9, keel_guest_start
    msr     vbar_el1, x9
    isb
    cmp     x11, #1
    b.eq    141f
    mrs     x1, actlr_el1
    b       142f
141: movz   x9, #0x33, lsl #16
    msr     cpacr_el1, x9
    isb
    .inst   0x04bf5021                      /* rdvl x1, #1 */
    msr     cpacr_el1, xzr
142: msr    vbar_el1, xzr
    isb
    mov     x1, x5
    mov     x2, #0
    bl      99f
    b       1b

150: /* KEYS: report (APIAKeyLo_EL1, TPIDR2_EL0 if a3 else 0), then
      * APIAKeyLo_EL1 = a1 and, if a3, TPIDR2_EL0 = a2 */
    mrs     x1, s3_0_c2_c1_0
    mov     x2, #0
    cbz     x13, 151f
    mrs     x2, s3_3_c13_c0_5
    msr     s3_3_c13_c0_5, x12
151: msr    s3_0_c2_c1_0, x11
    bl      99f
    b       1b

160: /* PMR: report (ICC_PMR_EL1, ICC_BPR1_EL1), then ICC_PMR_EL1 = a1 */
    mrs     x1, s3_0_c4_c6_0
    mrs     x2, s3_0_c12_c12_3
    msr     s3_0_c4_c6_0, x11
    bl      99f
    b       1b

170: /* IRQS: takes interrupts through the GIC's CPU interface: ICC_PMR_EL1
      * 0xff, group 1 on, the IRQ vector above, IRQs unmasked; if a1, the
      * virtual timer fires in a1 ticks (CNTV_TVAL_EL0); then, if a3, waits
      * until a2 interrupts came or a3 ticks of CNTVCT_EL0 passed; else
      * spins a2 times, or (a2 = 0) waits with WFI until an interrupt came.
      * Report (INTIDs taken, 10 bits each, the last lowest; how many) */
    adr     x9, keel_guest_start
    msr     vbar_el1, x9
    mov     x9, #0xff
    msr     s3_0_c4_c6_0, x9
    mov     x9, #1
    msr     s3_0_c12_c12_7, x9
    mov     x6, #0
    mov     x7, #0
    cbz     x11, 171f
    msr     cntv_tval_el0, x11
    msr     cntv_ctl_el0, x9
171: isb
    msr     daifclr, #2
    cbnz    x13, 175f
    cbz     x12, 173f
172: subs   x12, x12, #1
    b.ne    172b
    b       174f
173: wfi
    cbz     x6, 173b
    b       174f
175: mrs    x14, cntvct_el0
    add     x13, x13, x14
176: cmp    x6, x12
    b.hs    174f
    mrs     x14, cntvct_el0
    cmp     x14, x13
    b.lo    176b
174: msr    daifset, #2
    msr     cntv_ctl_el0, xzr
    msr     vbar_el1, xzr
    isb
    mov     x1, x7
    mov     x2, x6
    bl      99f
    b       1b

180: /* SGI: ICC_SGI1R_EL1 = a1 (an SGI exit keel makes of it); report
      * (0, 0) */
    msr     s3_0_c12_c11_5, x11
    mov     x1, #0
    mov     x2, #0
    bl      99f
    b       1b

99: /* REPORT (x1, x2); returns with x0 = the host's completion value */
    movz    x0, #0x0ff0
    movk    x0, #0xc600, lsl #16
    hvc     #0
    ret

109: .asciz "keel guest: hello from EL1\n"
    .balign 16
keel_guest_end:
