"""Generate the finance Q&A data set: train.jsonl and heldout.jsonl beside this script.

Every number in an answer is computed here from the numbers in its question (nothing typed
by hand), and each conversation records the template it came from and its key numbers/terms
in `meta` (used by the report's generation score and by tests/recipes/test_finance.py, which
recomputes them). The split is by TEMPLATE: a question template is either in the held-out set
or in the training set, never both, so held-out questions never appear in training, not even
as the same sentence with other numbers.

    python recipes/finance/make_data.py [--seed 7] [--out recipes/finance]
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

SYSTEM = "You are a careful personal-finance tutor. Explain briefly and show the calculation."


def money(x: float) -> str:
    return f"${x:,.2f}"


def pct(x: float, nd: int = 2) -> str:
    return f"{x * 100:.{nd}f}%"


# --- pure formulas (tests recompute answers with these and with independent code) ---------------

def future_value(p: float, rate: float, years: float, n: int = 1) -> float:
    return p * (1 + rate / n) ** (n * years)


def loan_payment(principal: float, annual_rate: float, months: int) -> float:
    r = annual_rate / 12
    return principal * r / (1 - (1 + r) ** -months)


def loan_balance(principal: float, annual_rate: float, months: int, paid: int) -> float:
    r = annual_rate / 12
    pay = loan_payment(principal, annual_rate, months)
    return principal * (1 + r) ** paid - pay * ((1 + r) ** paid - 1) / r


def cagr(start: float, end: float, years: float) -> float:
    return (end / start) ** (1 / years) - 1


def npv(rate: float, flows: list[float]) -> float:
    return sum(cf / (1 + rate) ** t for t, cf in enumerate(flows))


def bond_price(face: float, coupon_rate: float, ytm: float, years: int) -> float:
    c = face * coupon_rate
    return sum(c / (1 + ytm) ** t for t in range(1, years + 1)) + face / (1 + ytm) ** years


def annuity_fv(payment: float, annual_rate: float, years: int) -> float:
    r = annual_rate / 12
    n = 12 * years
    return payment * ((1 + r) ** n - 1) / r


# --- templates: (id, topic, heldout, fn(rng) -> (question, answer, keys)) ----------------------
TEMPLATES = []


def template(tid: str, topic: str, heldout: bool = False):
    def deco(fn):
        TEMPLATES.append((tid, topic, heldout, fn))
        return fn
    return deco


@template("ci_annual", "interest")
def _(rng):
    p, r, t = rng.choice([500, 1000, 2500, 4000, 8000, 12000]), rng.choice([3, 4, 5, 6, 7, 8]) / 100, rng.randint(2, 20)
    fv = future_value(p, r, t)
    return (f"I deposit {money(p)} at {pct(r, 0)} interest compounded once a year. How much will I have after {t} years?",
            f"Compound interest: FV = P(1 + r)^t = {money(p)} x (1 + {r:.2f})^{t} = {money(fv)}. "
            f"The interest earned is {money(fv - p)}.", [f"{fv:,.2f}"])


@template("ci_monthly", "interest", heldout=True)
def _(rng):
    p, r, t = rng.choice([1500, 3000, 5000, 7500, 10000]), rng.choice([2, 3, 4, 5, 6]) / 100, rng.randint(2, 15)
    fv = future_value(p, r, t, 12)
    return (f"What does {money(p)} grow to in {t} years if the bank pays {pct(r, 0)} a year, compounded monthly?",
            f"Compound interest: FV = P(1 + r/n)^(nt) = {money(p)} x (1 + {r:.2f}/12)^({12 * t}) = {money(fv)}. "
            f"The interest earned is {money(fv - p)}.", [f"{fv:,.2f}"])


@template("simple_interest", "interest")
def _(rng):
    p, r, t = rng.choice([800, 2000, 3500, 6000, 9000]), rng.choice([2, 4, 5, 6, 9]) / 100, rng.randint(1, 8)
    i = p * r * t
    return (f"How much simple interest does {money(p)} earn at {pct(r, 0)} per year over {t} years?",
            f"Simple interest: I = P x r x t = {money(p)} x {r:.2f} x {t} = {money(i)}. "
            f"The total after {t} years is {money(p + i)}.", [f"{i:,.2f}"])


@template("rule72", "interest")
def _(rng):
    r = rng.choice([2, 3, 4, 6, 8, 9, 12])
    approx, exact = 72 / r, math.log(2) / math.log(1 + r / 100)
    return (f"Using the rule of 72, how long does it take money to double at {r}% a year?",
            f"Rule of 72: years to double = 72 / {r} = {approx:.1f} years. "
            f"The exact answer is ln 2 / ln(1 + {r / 100:.2f}) = {exact:.1f} years.", [f"{approx:.1f}"])


@template("ear", "interest", heldout=True)
def _(rng):
    apr, n = rng.choice([6, 9, 12, 15, 18, 24]) / 100, rng.choice([4, 12, 365])
    ear = (1 + apr / n) ** n - 1
    return (f"A card charges an APR of {pct(apr, 0)} compounded {n} times a year. What is the effective annual rate?",
            f"Effective annual rate: EAR = (1 + APR/n)^n - 1 = (1 + {apr:.2f}/{n})^{n} - 1 = {pct(ear)}. "
            "It is higher than the APR because interest is charged on interest.", [pct(ear)])


@template("inflation_power", "inflation")
def _(rng):
    amt, i, t = rng.choice([1000, 5000, 20000, 50000]), rng.choice([2, 3, 4, 5, 6]) / 100, rng.randint(3, 25)
    real = amt / (1 + i) ** t
    return (f"With inflation at {pct(i, 0)} a year, what will {money(amt)} buy in {t} years, in today's money?",
            f"Purchasing power: today's value = amount / (1 + inflation)^t = {money(amt)} / (1 + {i:.2f})^{t} "
            f"= {money(real)}. Inflation erodes {pct(1 - real / amt, 1)} of its value.", [f"{real:,.2f}"])


@template("real_return", "inflation", heldout=True)
def _(rng):
    nom, i = rng.choice([4, 5, 6, 7, 8, 10]) / 100, rng.choice([1, 2, 3, 4, 5]) / 100
    real = (1 + nom) / (1 + i) - 1
    return (f"My savings earn {pct(nom, 0)} while prices rise {pct(i, 0)} a year. What is my real return?",
            f"Real return (Fisher equation): (1 + nominal) / (1 + inflation) - 1 = {1 + nom:.2f} / {1 + i:.2f} - 1 "
            f"= {pct(real)}. The quick approximation nominal - inflation gives {pct(nom - i)}.", [pct(real)])


@template("price_index", "inflation")
def _(rng):
    a, b = rng.choice([100, 120, 150, 200, 240]), 0
    b = round(a * (1 + rng.choice([2, 3, 5, 7, 9]) / 100), 1)
    infl = b / a - 1
    return (f"A price index rose from {a} to {b} over one year. What was the inflation rate?",
            f"Inflation rate = (new index - old index) / old index = ({b} - {a}) / {a} = {pct(infl)}.", [pct(infl)])


@template("bond_price", "bonds")
def _(rng):
    face, c, y, n = 1000, rng.choice([3, 4, 5, 6, 7]) / 100, rng.choice([2, 3, 4, 5, 6, 8]) / 100, rng.randint(2, 10)
    p = bond_price(face, c, y, n)
    rel = "below" if p < face else ("above" if p > face else "at")
    return (f"What is the price of a {n}-year bond with a {money(face)} face value, a {pct(c, 0)} annual coupon "
            f"and a market yield of {pct(y, 0)}?",
            f"Bond price = sum of coupons / (1 + y)^t + face / (1 + y)^n, with coupon {money(face * c)}: "
            f"price = {money(p)}. It trades {rel} par because the coupon is "
            f"{'lower' if c < y else ('higher' if c > y else 'equal to')} the yield.", [f"{p:,.2f}"])


@template("current_yield", "bonds")
def _(rng):
    face, c, price = 1000, rng.choice([3, 4, 5, 6, 8]) / 100, rng.choice([880, 920, 950, 980, 1020, 1050, 1100])
    cy = face * c / price
    return (f"A bond pays a {pct(c, 0)} coupon on {money(face)} face value and sells for {money(price)}. "
            "What is its current yield?",
            f"Current yield = annual coupon / price = {money(face * c)} / {money(price)} = {pct(cy)}.", [pct(cy)])


@template("zero_coupon", "bonds", heldout=True)
def _(rng):
    face, y, n = rng.choice([1000, 5000, 10000]), rng.choice([2, 3, 4, 5, 6]) / 100, rng.randint(2, 20)
    p = face / (1 + y) ** n
    return (f"How much should I pay today for a zero-coupon bond that repays {money(face)} in {n} years "
            f"if comparable bonds yield {pct(y, 0)}?",
            f"Zero-coupon price = face / (1 + y)^n = {money(face)} / (1 + {y:.2f})^{n} = {money(p)}.", [f"{p:,.2f}"])


@template("pe_ratio", "equities")
def _(rng):
    price, eps = rng.choice([24, 36, 48, 60, 75, 90, 120]), rng.choice([1.5, 2, 2.5, 3, 4, 5, 6])
    pe = price / eps
    return (f"A stock trades at {money(price)} and earned {money(eps)} per share last year. What is its P/E ratio?",
            f"P/E ratio = price / earnings per share = {money(price)} / {money(eps)} = {pe:.1f}. "
            f"Investors pay {pe:.1f} dollars for each dollar of annual earnings; the earnings yield is {pct(1 / pe)}.",
            [f"{pe:.1f}"])


@template("dividend_yield", "equities")
def _(rng):
    price, div = rng.choice([20, 40, 55, 80, 100, 150]), rng.choice([0.6, 1, 1.2, 2, 2.4, 3, 4])
    dy = div / price
    return (f"What is the dividend yield of a {money(price)} share that pays {money(div)} in dividends a year?",
            f"Dividend yield = annual dividend / price = {money(div)} / {money(price)} = {pct(dy)}.", [pct(dy)])


@template("eps", "equities")
def _(rng):
    ni, sh = rng.choice([5, 12, 30, 48, 90]) * 1_000_000, rng.choice([2, 4, 5, 8, 10]) * 1_000_000
    eps = ni / sh
    return (f"A company earned {money(ni)} of net income and has {sh:,} shares outstanding. What is its EPS?",
            f"Earnings per share = net income / shares = {money(ni)} / {sh:,} = {money(eps)}.", [f"{eps:,.2f}"])


@template("roe", "equities", heldout=True)
def _(rng):
    ni, eq = rng.choice([2, 5, 8, 12, 20]) * 1_000_000, rng.choice([25, 40, 60, 80, 100]) * 1_000_000
    roe = ni / eq
    return (f"Shareholders' equity is {money(eq)} and profit after tax was {money(ni)}. "
            "Calculate the return on equity.",
            f"Return on equity = net income / shareholders' equity = {money(ni)} / {money(eq)} = {pct(roe)}.",
            [pct(roe)])


@template("cagr", "equities")
def _(rng):
    a, t = rng.choice([1000, 5000, 10000, 25000]), rng.randint(3, 12)
    b = round(a * rng.uniform(1.2, 3.5), -1)
    g = cagr(a, b, t)
    return (f"An investment grew from {money(a)} to {money(b)} in {t} years. What was its CAGR?",
            f"CAGR = (end / start)^(1/years) - 1 = ({money(b)} / {money(a)})^(1/{t}) - 1 = {pct(g)} per year.",
            [pct(g)])


@template("portfolio_return", "diversification")
def _(rng):
    w = rng.choice([0.4, 0.5, 0.6, 0.7, 0.8])
    ra, rb = rng.choice([6, 7, 8, 9, 10]) / 100, rng.choice([2, 3, 4, 5]) / 100
    er = w * ra + (1 - w) * rb
    return (f"I hold {pct(w, 0)} stocks expected to return {pct(ra, 0)} and {pct(1 - w, 0)} bonds expected to "
            f"return {pct(rb, 0)}. What is the portfolio's expected return?",
            f"Expected return = weighted average = {w:.2f} x {pct(ra, 0)} + {1 - w:.2f} x {pct(rb, 0)} = {pct(er)}. "
            "Mixing assets changes the risk more than the return.", [pct(er)])


@template("portfolio_vol", "diversification", heldout=True)
def _(rng):
    w = rng.choice([0.5, 0.6, 0.7])
    sa, sb, rho = rng.choice([15, 18, 20]) / 100, rng.choice([5, 6, 8]) / 100, rng.choice([-0.2, 0, 0.2, 0.5])
    var = (w * sa) ** 2 + ((1 - w) * sb) ** 2 + 2 * w * (1 - w) * sa * sb * rho
    vol = math.sqrt(var)
    avg = w * sa + (1 - w) * sb
    return (f"Two assets have volatilities of {pct(sa, 0)} and {pct(sb, 0)} with correlation {rho}. "
            f"With {pct(w, 0)} in the first, how volatile is the mix?",
            f"Portfolio volatility = sqrt(w1^2 s1^2 + w2^2 s2^2 + 2 w1 w2 s1 s2 rho) = {pct(vol)}, below the "
            f"weighted average of {pct(avg)}: that gap is the benefit of diversification.", [pct(vol)])


@template("rebalance", "diversification")
def _(rng):
    total, target = rng.choice([20000, 50000, 100000]), rng.choice([0.5, 0.6, 0.7])
    stocks = round(total * (target + rng.choice([0.05, 0.08, 0.1, -0.06, -0.1])), -2)
    move = stocks - total * target
    action = "sell" if move > 0 else "buy"
    return (f"My {money(total)} portfolio targets {pct(target, 0)} stocks but stocks are now worth {money(stocks)}. "
            "How much should I move to rebalance?",
            f"Target stock value = {pct(target, 0)} x {money(total)} = {money(total * target)}. "
            f"You should {action} {money(abs(move))} of stocks and {'buy' if move > 0 else 'sell'} the same of bonds.",
            [f"{abs(move):,.2f}", action])


@template("budget_50_30_20", "budgeting")
def _(rng):
    inc = rng.choice([2400, 3000, 3600, 4200, 5000, 6500])
    return (f"My take-home pay is {money(inc)} a month. How does the 50/30/20 rule split it?",
            f"50/30/20 rule: needs 50% = {money(inc * 0.5)}, wants 30% = {money(inc * 0.3)}, "
            f"savings and debt repayment 20% = {money(inc * 0.2)}.", [f"{inc * 0.5:,.2f}", f"{inc * 0.2:,.2f}"])


@template("emergency_fund", "budgeting")
def _(rng):
    exp, months = rng.choice([1800, 2200, 2700, 3100, 4000]), rng.choice([3, 4, 6])
    return (f"My essential expenses are {money(exp)} a month. How big should a {months}-month emergency fund be?",
            f"Emergency fund = monthly essential expenses x months = {money(exp)} x {months} = {money(exp * months)}."
            , [f"{exp * months:,.2f}"])


@template("savings_goal", "budgeting", heldout=True)
def _(rng):
    pay, r, t = rng.choice([100, 200, 300, 500]), rng.choice([3, 4, 5, 6]) / 100, rng.randint(3, 15)
    fv = annuity_fv(pay, r, t)
    return (f"If I save {money(pay)} at the end of every month in an account paying {pct(r, 0)} a year, "
            f"how much will I have in {t} years?",
            f"Future value of monthly savings: FV = PMT x ((1 + r/12)^(12t) - 1) / (r/12) = {money(fv)}, of which "
            f"{money(pay * 12 * t)} are deposits and {money(fv - pay * 12 * t)} is interest.", [f"{fv:,.2f}"])


@template("savings_rate", "budgeting")
def _(rng):
    inc, spend = rng.choice([3000, 4000, 5000, 6000]), 0
    spend = round(inc * rng.uniform(0.6, 0.95), -1)
    rate = (inc - spend) / inc
    return (f"I earn {money(inc)} a month after tax and spend {money(spend)}. What is my savings rate?",
            f"Savings rate = (income - spending) / income = ({money(inc)} - {money(spend)}) / {money(inc)} = "
            f"{pct(rate, 1)}.", [pct(rate, 1)])


@template("loan_payment", "loans")
def _(rng):
    p, r, yrs = rng.choice([10000, 15000, 20000, 25000, 30000]), rng.choice([3, 4, 5, 6, 7, 8]) / 100, rng.choice([3, 4, 5, 6])
    m = yrs * 12
    pay = loan_payment(p, r, m)
    return (f"What is the monthly payment on a {money(p)} car loan at {pct(r, 0)} APR over {yrs} years?",
            f"Loan payment = P x r / (1 - (1 + r)^-n) with r = {r:.2f}/12 and n = {m}: payment = {money(pay)}. "
            f"Total interest over the loan is {money(pay * m - p)}.", [f"{pay:,.2f}"])


@template("mortgage_payment", "loans")
def _(rng):
    p, r, yrs = rng.choice([150000, 200000, 250000, 300000, 400000]), rng.choice([3, 4, 5, 6, 7]) / 100, rng.choice([15, 20, 30])
    m = yrs * 12
    pay = loan_payment(p, r, m)
    return (f"I am borrowing {money(p)} for a home at {pct(r, 0)} for {yrs} years. What is the monthly payment?",
            f"Mortgage payment = P x r / (1 - (1 + r)^-n) with r = {r:.2f}/12 and n = {m}: payment = {money(pay)}. "
            f"Total interest paid is {money(pay * m - p)}.", [f"{pay:,.2f}"])


@template("first_payment_split", "loans", heldout=True)
def _(rng):
    p, r, yrs = rng.choice([100000, 180000, 220000, 350000]), rng.choice([4, 5, 6]) / 100, rng.choice([15, 30])
    pay = loan_payment(p, r, yrs * 12)
    interest = p * r / 12
    return (f"On a {yrs}-year, {pct(r, 0)} mortgage of {money(p)}, how much of the first payment is interest "
            "and how much repays principal?",
            f"The payment is {money(pay)}. Interest for the first month = balance x r/12 = {money(p)} x {r:.2f}/12 = "
            f"{money(interest)}, so {money(pay - interest)} goes to principal.", [f"{interest:,.2f}", f"{pay - interest:,.2f}"])


@template("remaining_balance", "loans")
def _(rng):
    p, r, yrs, k = rng.choice([20000, 40000, 100000]), rng.choice([4, 5, 6, 8]) / 100, rng.choice([5, 10, 15]), rng.choice([12, 24, 36])
    bal = loan_balance(p, r, yrs * 12, k)
    return (f"After {k} monthly payments on a {money(p)} loan at {pct(r, 0)} over {yrs} years, what balance is left?",
            f"Remaining balance = P(1 + r)^k - PMT((1 + r)^k - 1)/r with PMT = {money(loan_payment(p, r, yrs * 12))}: "
            f"balance = {money(bal)}.", [f"{bal:,.2f}"])


@template("npv", "investing")
def _(rng):
    cost = rng.choice([5000, 10000, 20000, 50000])
    flows = [round(cost * rng.uniform(0.2, 0.45), -2) for _ in range(rng.randint(3, 5))]
    r = rng.choice([5, 6, 8, 10, 12]) / 100
    v = npv(r, [-cost, *flows])
    fl = ", ".join(money(f) for f in flows)
    return (f"A project costs {money(cost)} today and returns {fl} over the next years. What is its NPV at {pct(r, 0)}?",
            f"NPV = -cost + sum of CF_t / (1 + r)^t = {money(v)}. "
            f"{'Positive' if v > 0 else 'Negative'} NPV: the project {'adds' if v > 0 else 'destroys'} value at {pct(r, 0)}.",
            [f"{v:,.2f}" if v >= 0 else f"-{abs(v):,.2f}"])


@template("present_value", "investing", heldout=True)
def _(rng):
    fv, r, t = rng.choice([5000, 10000, 50000]), rng.choice([3, 5, 7, 8]) / 100, rng.randint(3, 20)
    pv = fv / (1 + r) ** t
    return (f"Discounting at {pct(r, 0)}, what is a promise of {money(fv)} received {t} years from now worth today?",
            f"Present value = FV / (1 + r)^t = {money(fv)} / (1 + {r:.2f})^{t} = {money(pv)}.", [f"{pv:,.2f}"])


@template("marginal_tax", "taxes")
def _(rng):
    # A hypothetical two-bracket system: teaches how marginal rates apply, not any country's law.
    limit, low, high = rng.choice([40000, 50000]), rng.choice([10, 15]) / 100, rng.choice([25, 30]) / 100
    inc = rng.choice([60000, 75000, 90000])
    tax = limit * low + (inc - limit) * high
    return (f"In a system taxing income up to {money(limit)} at {pct(low, 0)} and the rest at {pct(high, 0)}, "
            f"what tax is due on {money(inc)}?",
            f"Marginal brackets: {money(limit)} x {pct(low, 0)} = {money(limit * low)}, plus "
            f"{money(inc - limit)} x {pct(high, 0)} = {money((inc - limit) * high)}; total tax {money(tax)}, an "
            f"effective rate of {pct(tax / inc)}.", [f"{tax:,.2f}"])


@template("effective_tax", "taxes", heldout=True)
def _(rng):
    inc, tax = rng.choice([45000, 65000, 85000, 120000]), 0
    tax = round(inc * rng.uniform(0.12, 0.28), -1)
    return (f"Someone with {money(inc)} of income paid {money(tax)} in total income tax. What was their average tax rate?",
            f"Average (effective) tax rate = total tax / income = {money(tax)} / {money(inc)} = {pct(tax / inc)}; "
            "the marginal rate on the last dollar is usually higher.", [pct(tax / inc)])


@template("deduction_value", "taxes")
def _(rng):
    ded, rate = rng.choice([1000, 2000, 3000, 5000]), rng.choice([12, 20, 22, 24, 32]) / 100
    return (f"How much tax does a {money(ded)} deduction save someone whose marginal tax rate is {pct(rate, 0)}?",
            f"A deduction lowers taxable income, so it saves deduction x marginal rate = {money(ded)} x "
            f"{pct(rate, 0)} = {money(ded * rate)}. A credit of the same size would save the full {money(ded)}.",
            [f"{ded * rate:,.2f}"])


# Concept questions without numbers. Each concept is taught with its `train` phrasings and tested
# with DIFFERENT `heldout` phrasings (a separate template id, `<id>_h`), so the held-out set asks
# what the model could learn without repeating a training sentence; concepts with no `train`
# phrasings are never taught and show whether fine-tuning broke what the base already knew.
# `keys`: every entry must appear in a right answer (a list entry: any one of its alternatives);
# `wrong`: phrases that contradict the answer (e.g. the opposite direction of a relationship) and
# make it wrong even when the keys are there.
FALL = ["fall", "falls", "drop", "decline", "go down", "goes down", "decrease", "lower"]
RISE = ["rise", "rises", "go up", "goes up", "increase", "higher"]
CONCEPTS = [
    dict(id="c_compound", topic="interest",
         train=["What is compound interest?", "Explain compound interest simply.",
                "How is compound interest different from simple interest?",
                "What does it mean when interest compounds?",
                "How does compounding help a savings account grow?",
                "Can you explain compounding?"],
         heldout=["In plain words, how does interest on interest work?",
                  "Why does money grow faster with compounding than with simple interest?"],
         answer="Compound interest is interest earned on both the original deposit and the interest already added, "
                "so growth accelerates over time. Simple interest is paid on the original principal only.",
         keys=[["interest on interest", "interest already", "earned interest", "accumulated interest",
                "previous interest", "interest that has been added", "interest already added"]], wrong=[]),
    dict(id="c_apr", topic="interest",
         train=["What is an APR?", "What does APR mean on a loan?", "What does the annual percentage rate measure?",
                "How is APR different from the effective annual rate?",
                "Explain APR briefly.",
                "Why do lenders quote an APR?"],
         heldout=["What do the letters APR stand for on a credit card offer?"],
         answer="APR, the annual percentage rate, is the yearly cost of borrowing before compounding. The effective "
                "annual rate adds the effect of compounding within the year.",
         keys=[["annual percentage rate"]], wrong=[]),
    dict(id="c_inflation", topic="inflation",
         train=["What is inflation?", "Why does inflation matter for savers?", "How does inflation affect my savings?",
                "What does inflation do to the value of money?",
                "Explain inflation in simple terms.",
                "Why should my savings beat inflation?"],
         heldout=["What happens to the purchasing power of cash when prices keep rising?"],
         answer="Inflation is the general rise in prices over time. It lowers the purchasing power of money, so savings "
                "must earn more than the inflation rate to grow in real terms.",
         keys=[["lower", "reduc", "erode", "decreas", "falls", "lose", "less"]],
         wrong=["increases the purchasing power", "raises the purchasing power", "purchasing power rises",
                "purchasing power increases", "buy more"]),
    dict(id="c_bond_yield", topic="bonds",
         train=["Why do bond prices fall when interest rates rise?", "What happens to bond prices when yields go up?",
                "How are bond prices and interest rates related?", "Do bond prices rise or fall when rates increase?",
                "What is the link between bond yields and bond prices?"],
         heldout=["If market interest rates go up, what happens to the price of a bond I already own?",
                  "Rates just jumped. Is my existing bond now worth more or less?"],
         answer="When interest rates rise, bond prices fall. A bond's coupons are fixed, so when market yields rise, "
                "new bonds pay more and existing bonds must fall in price until their yield matches. Prices and "
                "yields move in opposite directions.",
         keys=[FALL + ["less", "opposite"]],
         wrong=["bond prices rise", "bond prices go up", "bond prices increase", "price rises", "price goes up",
                "price increases", "bond increases", "bond rises", "bond goes up", "worth more", "prices also rise",
                "same direction"]),
    dict(id="c_rates_loans", topic="loans",
         train=["What happens to my variable-rate loan payment when interest rates rise?",
                "Do higher interest rates make borrowing more expensive?",
                "How do rate hikes affect an adjustable-rate loan?",
                "Why does borrowing cost more when interest rates go up?",
                "What happens to a variable-rate mortgage when rates climb?"],
         heldout=["The central bank raised rates. Will my adjustable mortgage payment go up or down?"],
         answer="When interest rates rise, the rate on a variable or adjustable loan resets higher, so the monthly "
                "payment rises and borrowing becomes more expensive.",
         keys=[RISE + ["more expensive"]],
         wrong=["payment falls", "payment goes down", "payment decreases", "cheaper", "lower payment"]),
    dict(id="c_risk_return", topic="investing",
         train=["What is the relationship between risk and return?", "Why do riskier investments pay more on average?",
                "Why don't safe investments pay much?",
                "Do higher returns come with higher risk?",
                "What is the risk-return tradeoff?"],
         heldout=["Should I expect a higher return from a safer investment or a riskier one?"],
         answer="Risk and return go together: investors demand a higher expected return for taking more risk, so "
                "riskier investments pay more on average but can also lose more. Safer investments usually return less.",
         keys=[["higher expected return", "higher return", "pay more", "more return", "riskier"]],
         wrong=["safer investments return more", "safer investment has a higher return", "less risk means more return"]),
    dict(id="c_pe", topic="equities",
         train=["What does a high P/E ratio mean?", "How should I read a P/E ratio?", "What is the P/E ratio of a stock?",
                "What does the P/E ratio tell me about a stock?",
                "How is the P/E ratio calculated?",
                "Is a high P/E ratio good or bad?"],
         heldout=["What does the price-to-earnings ratio compare?"],
         answer="The P/E ratio is price divided by earnings per share. A high P/E means investors pay more for each "
                "dollar of earnings, usually because they expect growth, but it can also signal an expensive stock.",
         keys=["earnings", "price"], wrong=[]),
    dict(id="c_dividend", topic="equities",
         train=["What is a dividend?", "How do dividends work?",
                "What are dividends?",
                "Why do some companies pay dividends?",
                "What is a dividend payment?"],
         heldout=["Who receives a company's dividends, and where does the money come from?"],
         answer="A dividend is a share of company profits paid to shareholders, usually in cash every quarter. The "
                "dividend yield is the annual dividend divided by the share price.",
         keys=[["shareholder", "stockholder", "investors who own"], ["profit", "earnings"]], wrong=[]),
    dict(id="c_stock_bond", topic="equities",
         train=["What is the difference between a stock and a bond?", "Is a bond a loan or a share of ownership?",
                "Stocks vs bonds: what's the difference?",
                "Does buying a bond make me an owner of the company?",
                "How do stocks differ from bonds?"],
         heldout=["When I buy a share of stock, do I lend money to the company or own part of it?"],
         answer="A stock is a share of ownership in a company; a bond is a loan to the issuer that pays interest and "
                "returns the principal at maturity. Stockholders own part of the company, bondholders are lenders.",
         keys=[["ownership", "own part", "owner", "own a part", "own a share"]],
         wrong=["stock is a loan", "stockholders are lenders"]),
    dict(id="c_index_fund", topic="diversification",
         train=["What is an index fund?", "Why do people buy index funds?",
                "How does an index fund work?",
                "What are the benefits of an index fund?",
                "Is an index fund a good way to diversify?"],
         heldout=["What does a fund that tracks a market index hold?"],
         answer="An index fund holds all the stocks or bonds of a market index, such as a broad stock market index. "
                "It gives wide diversification at low cost, and it does not try to beat the market.",
         keys=[["index"], ["divers", "many", "all the stocks", "all the", "low cost"]], wrong=[]),
    dict(id="c_diversify", topic="diversification",
         train=["Why should I diversify my investments?", "What is the point of diversification?",
                "Does owning many different assets lower risk?",
                "How does diversification reduce risk?",
                "What does it mean to diversify a portfolio?"],
         heldout=["Is it safer to put all my savings into one company's stock or spread them across many?"],
         answer="Diversification spreads money across assets that do not move together, so a loss in one is softened "
                "by others. It lowers risk without necessarily lowering expected return.",
         keys=[["risk"], ["spread", "divers", "many"]],
         wrong=["safer to put all", "one company's stock is safer", "increases risk"]),
    dict(id="c_budget", topic="budgeting",
         train=["How do I start a budget?", "What is the first step in budgeting?",
                "How do I make a budget?",
                "What should a beginner's budget include?",
                "How can I begin tracking my spending?"],
         heldout=["I have never made a budget. Where should I begin?"],
         answer="Start by tracking income and every expense for a month, then sort spending into needs, wants and "
                "savings. Set limits for each category and pay yourself first by saving at the start of the month.",
         keys=[["track", "list", "write down", "record"], ["expense", "spending"]], wrong=[]),
    dict(id="c_emergency", topic="budgeting",
         train=["Why do I need an emergency fund?", "What is an emergency fund for?",
                "How large should an emergency fund be?",
                "How much should I keep in an emergency fund?",
                "What is a good size for an emergency fund?"],
         heldout=["How many months of expenses should I keep as a cash cushion for emergencies?"],
         answer="An emergency fund is cash set aside for surprises such as job loss or repairs, typically three to six "
                "months of essential expenses, kept in a safe, easy-to-reach account.",
         keys=[["three", "3"], ["six", "6"]], wrong=[]),
    dict(id="c_amortization", topic="loans",
         train=["What is loan amortization?", "How does an amortizing loan work?",
                "What does an amortization schedule show?",
                "How are mortgage payments split between interest and principal?"],
         heldout=["Early in a mortgage, does most of each payment go to interest or to principal?"],
         answer="Amortization means repaying a loan with equal payments that cover interest and principal. Early "
                "payments are mostly interest; later ones are mostly principal as the balance shrinks.",
         keys=[["mostly interest", "most of it is interest", "mainly interest", "goes to interest",
                "mostly to interest", "mostly goes to interest"]],
         wrong=["mostly principal at first", "early payments are mostly principal"]),
    dict(id="c_marginal", topic="taxes",
         train=["What is a marginal tax rate?", "How do tax brackets work?",
                "What does it mean to be in a higher tax bracket?",
                "Explain progressive tax brackets.",
                "How is income taxed across brackets?"],
         heldout=["If a raise moves me into a higher tax bracket, is all my income taxed at the higher rate?"],
         answer="With progressive brackets each slice of income is taxed at its own rate. The marginal rate applies to "
                "your last dollar of income; moving into a higher bracket only raises tax on the income above the "
                "threshold, not on all of it.",
         keys=[["above the threshold", "only the income above", "only on the income", "not on all", "only the part",
                "each slice", "only the portion"]],
         wrong=["all your income is taxed at the higher", "all of your income is taxed at the higher"]),
    dict(id="c_deduction", topic="taxes",
         train=["What is the difference between a tax deduction and a tax credit?",
                "Is a tax credit better than a deduction?",
                "How much is a tax deduction worth?",
                "How does a tax credit work?",
                "What does a tax deduction reduce?"],
         heldout=["Which saves more tax: a $1,000 credit or a $1,000 deduction?"],
         answer="A deduction reduces taxable income, so it saves the deduction times your marginal rate. A credit "
                "reduces the tax itself dollar for dollar, so a credit is worth more than a deduction of the same size.",
         keys=["credit", ["dollar for dollar", "worth more", "saves more", "more valuable", "is better"]],
         wrong=["deduction is worth more", "deduction saves more", "deduction is better"]),
    # Never taught: the base's knowledge the fine-tune must not break.
    dict(id="c_cpi", topic="inflation", train=[],
         heldout=["How is inflation usually measured?", "What index tracks consumer prices?"],
         answer="Inflation is usually measured with a consumer price index, the cost of a fixed basket of goods and "
                "services compared over time. The percentage change of the index is the inflation rate.",
         keys=[["price index", "cpi"]], wrong=[]),
    dict(id="c_duration", topic="bonds", train=[],
         heldout=["What does bond duration tell me?", "Do long-term bonds react more or less to rate changes than short-term ones?"],
         answer="Duration measures how sensitive a bond's price is to interest rate changes: a duration of 5 means "
                "roughly a 5% price drop for a 1 percentage point rise in yields. Longer bonds have higher duration, "
                "so they react more.",
         keys=[["sensitiv", "react more", "more sensitive", "change more"]], wrong=["react less", "less sensitive"]),
    dict(id="c_credit_score", topic="loans", train=[],
         heldout=["What affects my credit score?", "How can I improve a credit score?"],
         answer="Credit scores depend mostly on paying on time, how much of your credit limits you use, the length of "
                "your credit history and recent applications. Paying every bill on time matters most.",
         keys=[["on time", "on-time", "payment history"]], wrong=[]),
]

# Small enough that the CPU profile (~40k tokens) sees most of the set once; concepts are repeated
# in every epoch so they carry weight next to the longer worked calculations.
TRAIN_PER_TEMPLATE = 20
HELDOUT_PER_TEMPLATE = 6


def conversation(q: str, a: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]


def generate(seed: int = 7) -> tuple[list[dict], list[dict]]:
    """(train, heldout) records; deterministic for a seed."""
    rng = random.Random(seed)
    train, held = [], []
    for tid, topic, heldout, fn in TEMPLATES:
        seen: set[str] = set()
        want = HELDOUT_PER_TEMPLATE if heldout else TRAIN_PER_TEMPLATE
        for _ in range(want * 20):
            if len(seen) >= want:
                break
            q, a, keys = fn(rng)
            if q in seen:
                continue
            seen.add(q)
            rec = {"messages": conversation(q, a),
                   "meta": {"template": tid, "topic": topic, "kind": "calculation", "keys": keys}}
            (held if heldout else train).append(rec)
    for c in CONCEPTS:
        for split, phrasings, tid in ((train, c["train"], c["id"]), (held, c["heldout"], c["id"] + "_h")):
            kind = "concept" if c["train"] else "concept-unseen"
            for q in phrasings:
                split.append({"messages": conversation(q, c["answer"]),
                              "meta": {"template": tid, "topic": c["topic"], "kind": kind, "keys": c["keys"],
                                       "wrong": c["wrong"]}})
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = ap.parse_args(argv)
    train, held = generate(args.seed)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "heldout.jsonl", held)
    print(f"wrote {len(train)} training and {len(held)} held-out conversations to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
